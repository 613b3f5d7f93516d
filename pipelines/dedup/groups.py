"""Duplicate groups, one kind at a time, on plain arrays (no Ray): exact, perceptual and semantic.

Every kind ends the same way: rows joined by a duplicate relation form connected groups, and each group keeps
one representative by one rule, :func:`keep_order`: the highest aesthetic score (a missing score ranks last),
then the lowest key (byte order). Every other member is removed with ``duplicate_of`` = the representative.
Results depend only on the rows, never on their order or on how they were batched: callers sort by key.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

HASH_BITS = 64


def keep_order(keys: np.ndarray, aesthetic: np.ndarray) -> np.ndarray:
    """Indices from the row a group keeps first to the one it keeps last (highest aesthetic, then lowest key)."""
    score = np.where(np.isnan(aesthetic), -np.inf, aesthetic.astype(np.float64))
    return np.lexsort((np.asarray(keys, dtype=object).astype(str), -score))


@dataclass(frozen=True)
class Groups:
    """Removed rows of one kind: ``removed[i]`` duplicates ``rep[i]`` (row indices), with ``similarity[i]``."""

    removed: np.ndarray
    rep: np.ndarray
    similarity: np.ndarray

    @staticmethod
    def empty() -> Groups:
        return Groups(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))


def representatives(labels: np.ndarray, keys: np.ndarray, aesthetic: np.ndarray) -> np.ndarray:
    """For every row, the index of its group's representative (groups given by ``labels``)."""
    order = keep_order(keys, aesthetic)
    first = {}
    for i in order:  # the first row of each label in keep order is its representative
        first.setdefault(int(labels[i]), int(i))
    return np.asarray([first[int(label)] for label in labels], dtype=np.int64)


def group_edges(n: int, i: np.ndarray, j: np.ndarray, keys: np.ndarray, aesthetic: np.ndarray) -> np.ndarray:
    """Representatives of the connected groups of ``n`` rows joined by edges ``(i, j)``."""
    if len(i) == 0:
        return np.arange(n, dtype=np.int64)
    graph = coo_matrix((np.ones(len(i), np.int8), (i, j)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    return representatives(labels, keys, aesthetic)


def exact_groups(keys: np.ndarray, sha256: np.ndarray, aesthetic: np.ndarray) -> Groups:
    """Rows with the same image bytes (sha256): similarity 1."""
    _, labels = np.unique(np.asarray(sha256, dtype=object).astype(str), return_inverse=True)
    rep = representatives(labels, keys, aesthetic)
    removed = np.flatnonzero(rep != np.arange(len(rep)))
    return Groups(removed, rep[removed], np.ones(len(removed), np.float32))


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bitwise Hamming distance of uint64 hashes."""
    return np.bitwise_count(np.bitwise_xor(a.astype(np.uint64), b.astype(np.uint64))).astype(np.int64)


def band_values(phash: np.ndarray, bands: int) -> np.ndarray:
    """(n, bands) uint64: the hash cut into ``bands`` contiguous bit ranges (widths differ by at most one).

    Two hashes within Hamming distance ``bands - 1`` agree on at least one band (pigeonhole), so banding finds
    every such pair; pairs further apart are found when some band happens to agree (LSH).
    """
    if not 1 <= bands <= HASH_BITS:
        raise ValueError(f"bands={bands} must be in 1..{HASH_BITS}")
    edges = np.linspace(0, HASH_BITS, bands + 1).round().astype(int)
    h = phash.astype(np.uint64)
    out = np.empty((len(h), bands), np.uint64)
    for b in range(bands):
        width = edges[b + 1] - edges[b]
        out[:, b] = (h >> np.uint64(HASH_BITS - edges[b + 1])) & np.uint64((1 << width) - 1)
    return out


def bucket_pairs(bucket: np.ndarray, phash: np.ndarray, max_distance: int, max_bucket_rows: int) -> tuple:
    """Pairs ``(i, j, distance)``, i < j, of rows in the same bucket whose hashes are within ``max_distance``.

    Rows with the same whole hash are chained to the first of them (linear, whatever the bucket size); distinct
    hashes in one bucket are compared pairwise, in chunks of ``max_bucket_rows`` when a bucket is larger
    (pairs across chunks are then missed: ``n_capped`` counts the buckets that were cut).
    """
    order = np.lexsort((phash, bucket))
    bucket, phash = bucket[order], phash[order]
    starts = np.flatnonzero(np.r_[True, bucket[1:] != bucket[:-1]])
    ends = np.r_[starts[1:], len(bucket)]
    out_i, out_j, out_d, n_capped = [], [], [], 0
    for s, e in zip(starts, ends, strict=True):
        if e - s < 2:
            continue
        h = phash[s:e]
        first_of_hash = np.r_[True, h[1:] != h[:-1]]
        heads = np.flatnonzero(first_of_hash)
        head_of = heads[np.cumsum(first_of_hash) - 1]
        same = np.flatnonzero(~first_of_hash)  # identical hashes: chained to the first, distance 0
        out_i.append(order[s + head_of[same]])
        out_j.append(order[s + same])
        out_d.append(np.zeros(len(same), np.int64))
        n_capped += int(len(heads) > max_bucket_rows)
        for c in range(0, len(heads), max_bucket_rows):
            chunk = heads[c : c + max_bucket_rows]
            a, b = np.triu_indices(len(chunk), k=1)
            d = hamming(h[chunk[a]], h[chunk[b]])
            near = d <= max_distance
            out_i.append(order[s + chunk[a[near]]])
            out_j.append(order[s + chunk[b[near]]])
            out_d.append(d[near])
    if not out_i:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64), n_capped
    i, j = np.concatenate(out_i), np.concatenate(out_j)
    lo, hi = np.minimum(i, j), np.maximum(i, j)
    return lo, hi, np.concatenate(out_d), n_capped


def perceptual_groups(
    keys: np.ndarray, phash: np.ndarray, aesthetic: np.ndarray, i: np.ndarray, j: np.ndarray
) -> Groups:
    """Groups joined by pHash edges ``(i, j)``; similarity = 1 - hamming(row, representative) / 64."""
    rep = group_edges(len(keys), i, j, keys, aesthetic)
    removed = np.flatnonzero(rep != np.arange(len(rep)))
    similarity = 1.0 - hamming(phash[removed], phash[rep[removed]]) / HASH_BITS
    return Groups(removed, rep[removed], similarity.astype(np.float32))


@dataclass(frozen=True)
class Semantic:
    """One cluster's semantic verdicts: ``groups`` (among the alive rows), and every row's nearest-neighbour
    cosine (NaN for a cluster of one)."""

    groups: Groups
    nn_similarity: np.ndarray
    n_pairs: int


def semantic_groups(
    keys: np.ndarray,
    unit: np.ndarray,
    aesthetic: np.ndarray,
    alive: np.ndarray,
    epsilon: float,
    block_rows: int,
) -> Semantic:
    """SemDeDup within one cluster: alive rows with cosine >= 1 - epsilon are joined; groups keep one row.

    ``unit`` holds L2-normalised float32 embeddings, rows sorted by key; similarities are computed in blocks of
    ``block_rows`` rows (memory ``block_rows`` × cluster size), in an order fixed by the keys alone.
    """
    n = len(keys)
    nn = np.full(n, np.nan, np.float32)
    edges_i, edges_j = [], []
    threshold = np.float32(1.0 - epsilon)
    for start in range(0, n, block_rows):
        sims = unit[start : start + block_rows] @ unit.T
        rows = np.arange(start, min(start + block_rows, n))
        sims[rows - start, rows] = -np.inf  # not its own neighbour
        if n > 1:  # the nearest one's cosine, recomputed row by row: a GEMM's last bits follow its block shape
            best = sims.argmax(axis=1)
            nn[rows] = np.einsum("ij,ij->i", unit[rows], unit[best])
        a, b = np.nonzero(sims >= threshold)
        a = a + start
        keep = (a < b) & alive[a] & alive[b]
        edges_i.append(a[keep])
        edges_j.append(b[keep])
    i, j = np.concatenate(edges_i), np.concatenate(edges_j)
    rep = group_edges(n, i, j, keys, aesthetic)
    removed = np.flatnonzero(rep != np.arange(n))
    similarity = np.einsum("ij,ij->i", unit[removed], unit[rep[removed]]).astype(np.float32)
    return Semantic(Groups(removed, rep[removed], similarity), nn, len(i))


def reference_matches(
    unit: np.ndarray, reference: np.ndarray, epsilon: float
) -> tuple[np.ndarray, np.ndarray]:
    """For each row, the index of its most similar reference row and that cosine; index -1 where the best
    cosine is below 1 - epsilon."""
    if len(reference) == 0 or len(unit) == 0:
        return np.full(len(unit), -1, np.int64), np.full(len(unit), np.nan, np.float32)
    sims = unit @ reference.T
    best = sims.argmax(axis=1)
    cos = sims[np.arange(len(unit)), best].astype(np.float32)
    return np.where(cos >= np.float32(1.0 - epsilon), best, -1), cos


def l2_normalise(embeds: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32; an all-zero row stays zero)."""
    x = np.asarray(embeds, dtype=np.float32)
    norm = np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    return (x / np.where(norm > 0, norm, 1.0)).astype(np.float32)
