"""k-means for SemDeDup: fitted once on a seeded sample, then every shard assigned by tasks.

faiss fits the centroids: its k-means is the one SemDeDup and NeMo Curator use, it runs 10^5 × 768 points ×
10^3 centroids in seconds on two cores, and it takes a seed. (scikit-learn's KMeans is several times slower
at this size and would be one more dependency.) Assignment is plain float64 numpy, row by row in effect: a
row's cluster depends on nothing but the row and the centroids, never on the batch it came in.

A cluster that the sample says will be larger than ``max_cluster_rows`` is split before any assignment: its
sample points get a k-means of their own, and its centroid is replaced by theirs. Memory per cluster task
is therefore bounded by the sample's estimate of the largest cluster.
"""

from __future__ import annotations

import math

import numpy as np

MIN_POINTS_PER_CENTROID = 39  # faiss warns below this


def n_clusters(n_rows: int, cluster_rows: int) -> int:
    return max(1, math.ceil(n_rows / cluster_rows))


def _kmeans(points: np.ndarray, k: int, iterations: int, seed: int) -> np.ndarray:
    import faiss

    k = max(1, min(k, len(points)))
    if k == 1:
        return points.mean(axis=0, keepdims=True).astype(np.float32)
    km = faiss.Kmeans(points.shape[1], k, niter=iterations, seed=seed, spherical=True, verbose=False,
                      min_points_per_centroid=1, max_points_per_centroid=len(points))  # fmt: skip
    km.train(np.ascontiguousarray(points, dtype=np.float32))
    return np.asarray(km.centroids, dtype=np.float32)


def assign(unit: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """The nearest centroid (largest cosine; ties to the lowest index) of each L2-normalised row."""
    if len(unit) == 0:
        return np.zeros(0, np.int32)
    sims = unit.astype(np.float64) @ centroids.astype(np.float64).T
    return sims.argmax(axis=1).astype(np.int32)


def fit_centroids(
    sample: np.ndarray, n_rows: int, cluster_rows: int, max_cluster_rows: int, iterations: int, seed: int
) -> np.ndarray:
    """Centroids for ``n_rows`` rows from an L2-normalised ``sample`` of them: about ``n_rows / cluster_rows``
    clusters, the ones the sample predicts over ``max_cluster_rows`` split into ``cluster_rows``-sized parts."""
    centroids = _kmeans(sample, n_clusters(n_rows, cluster_rows), iterations, seed)
    labels = assign(sample, centroids)
    scale = n_rows / max(1, len(sample))
    parts = []
    for c in range(len(centroids)):
        members = sample[labels == c]
        estimate = len(members) * scale
        if estimate > max_cluster_rows and len(members) > 1:
            parts.append(_kmeans(members, math.ceil(estimate / cluster_rows), iterations, seed + 1 + c))
        else:
            parts.append(centroids[c : c + 1])
    return np.concatenate(parts).astype(np.float32)
