"""The dedup algorithms on plain arrays (no Ray): grouping rule, LSH banding, SemDeDup, k-means, verdicts."""

from __future__ import annotations

import hashlib
from itertools import combinations

import imagehash
import numpy as np
import pytest
from PIL import Image

from benchmarks.dedup_data import COPY_COSINE, DECOY_COSINE, embeddings
from pipelines.core.images import decode_rgb, perceptual_hash
from pipelines.dedup import groups as g
from pipelines.dedup import steps
from pipelines.dedup.kmeans import assign, fit_centroids
from pipelines.dedup.pipeline import resolve_final
from schemas.columns import AESTHETIC_SCORE, DEDUP_CLUSTER, KEY, NN_SIMILARITY, SOURCE
from tests.pipelines.planted import planted


def test_keep_order_is_highest_aesthetic_then_lowest_key() -> None:
    keys = np.array(["b", "a", "c", "d"], dtype=object)
    aesthetic = np.array([5.0, 5.0, np.nan, 6.0], np.float32)
    assert [keys[i] for i in g.keep_order(keys, aesthetic)] == ["d", "a", "b", "c"]  # a missing score is last
    found = g.exact_groups(keys, np.array(["x", "x", "x", "y"], dtype=object), aesthetic)
    assert sorted(zip(keys[found.removed], keys[found.rep], strict=True)) == [("b", "a"), ("c", "a")]


def test_perceptual_hash_is_imagehash_phash_of_the_same_decode() -> None:
    data = planted()["chelsea"][0]
    rgb = decode_rgb(data, max_pixels=10**8)
    assert perceptual_hash(rgb) == int(str(imagehash.phash(Image.fromarray(rgb))), 16)
    assert hashlib.sha256(data).hexdigest() == hashlib.sha256(planted()["chelsea__exact"][0]).hexdigest()


@pytest.mark.parametrize("bands", [2, 4, 6, 8])
def test_banding_finds_every_pair_within_bands_minus_one_bits(bands: int) -> None:
    rng = np.random.default_rng(bands)
    base = rng.integers(0, 2**63, 300, dtype=np.int64).astype(np.uint64) << np.uint64(1)
    flips = [rng.choice(64, size=bands - 1, replace=False) for _ in base]
    near = np.asarray(
        [b ^ np.uint64(sum(1 << int(f) for f in fl)) for b, fl in zip(base, flips, strict=True)], np.uint64
    )
    assert (g.hamming(base, near) == bands - 1).all()
    values = g.band_values(np.r_[base, near], bands)
    assert values.shape == (600, bands) and (values.max(axis=0) < 2 ** np.ceil(64 / bands)).all()
    shared = (values[:300] == values[300:]).any(axis=1)
    assert shared.all()  # pigeonhole: bands - 1 flipped bits leave one band whole


def test_bucket_pairs_equal_brute_force_within_each_bucket() -> None:
    rng = np.random.default_rng(0)
    phash = rng.integers(0, 2**12, 400).astype(np.uint64)  # short hashes: many near pairs
    bucket = rng.integers(0, 5, 400).astype(np.uint64)
    phash[:20] = phash[20:40]  # identical hashes, chained to one of them
    bucket[:20] = bucket[20:40]
    i, j, d, capped = g.bucket_pairs(bucket, phash, max_distance=3, max_bucket_rows=1000)
    found = set(zip(i.tolist(), j.tolist(), strict=True))
    truth = {(a, b) for a, b in combinations(range(400), 2)
             if bucket[a] == bucket[b] and g.hamming(phash[a:a + 1], phash[b:b + 1])[0] <= 3}  # fmt: skip
    assert capped == 0 and found <= truth
    # identical hashes are chained rather than all paired: the same groups, fewer pairs
    rep = g.group_edges(400, i, j, np.arange(400).astype(str).astype(object), np.zeros(400, np.float32))
    t_i, t_j = np.asarray(sorted(truth)).T
    assert (
        rep
        == g.group_edges(400, t_i, t_j, np.arange(400).astype(str).astype(object), np.zeros(400, np.float32))
    ).all()
    assert (d == g.hamming(phash[i], phash[j])).all()
    _, _, _, capped = g.bucket_pairs(bucket, phash, max_distance=3, max_bucket_rows=10)
    assert capped == 5  # every bucket was cut


def test_semantic_groups_equal_brute_force_and_do_not_depend_on_block_rows() -> None:
    x, pairs = embeddings(600, 64, seed=3, planted_fraction=0.2)
    keys = np.asarray([f"k{i:04d}" for i in range(600)], dtype=object)
    aesthetic = np.random.default_rng(0).uniform(3, 7, 600).astype(np.float32)
    alive = np.ones(600, bool)
    results = [g.semantic_groups(keys, x, aesthetic, alive, 0.05, block) for block in (7, 64, 1000)]
    first = results[0]
    for other in results[1:]:
        assert (first.groups.removed == other.groups.removed).all() and (
            first.groups.rep == other.groups.rep
        ).all()
        assert np.array_equal(first.nn_similarity, other.nn_similarity)
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    assert np.allclose(first.nn_similarity, sims.max(axis=1), atol=1e-6)
    truth = {(a, b) for a, b in zip(*np.nonzero(np.triu(sims >= 0.95, 1)), strict=True)}
    assert truth >= {tuple(sorted(p)) for p in pairs}  # the planted copies (cosine 0.985) are ε-pairs
    rep = np.arange(600)
    rep[first.groups.removed] = first.groups.rep
    assert all(rep[a] == rep[b] for a, b in truth)  # every ε-pair ends in one group
    assert first.n_pairs == len(truth)
    # rows removed by an earlier kind join nothing
    dead = alive.copy()
    dead[[p[1] for p in pairs]] = False
    fewer = g.semantic_groups(keys, x, aesthetic, dead, 0.05, 64)
    assert not set(fewer.groups.removed) & {p[1] for p in pairs} and len(fewer.groups.removed) < len(
        first.groups.removed
    )


def test_synthetic_copies_and_decoys_sit_either_side_of_epsilon() -> None:
    x, pairs = embeddings(2000, 768, seed=0)
    cos = [float(x[i] @ x[j]) for i, j in pairs]
    assert np.allclose(cos, COPY_COSINE, atol=1e-4) and 1 - COPY_COSINE < 0.05 < 1 - DECOY_COSINE


def test_reference_matches_within_epsilon_only() -> None:
    x, _ = embeddings(50, 32, seed=1)
    reference = np.r_[x[:3], -x[3:4]]
    best, cos = g.reference_matches(x, reference, 0.01)
    assert best[:3].tolist() == [0, 1, 2] and (best[3:] == -1).all() and np.allclose(cos[:3], 1.0)


def test_kmeans_assignment_is_per_row_and_large_clusters_are_split() -> None:
    x, _ = embeddings(3000, 32, seed=2)
    centroids = fit_centroids(x[:1000], 3000, cluster_rows=300, max_cluster_rows=600, iterations=10, seed=0)
    assert np.array_equal(
        assign(x, centroids), np.concatenate([assign(x[i : i + 7], centroids) for i in range(0, 3000, 7)])
    )
    assert np.array_equal(centroids, fit_centroids(x[:1000], 3000, 300, 600, 10, 0))  # seeded
    coarse = fit_centroids(x[:1000], 3000, cluster_rows=1000, max_cluster_rows=10**6, iterations=10, seed=0)
    split = fit_centroids(x[:1000], 3000, cluster_rows=1000, max_cluster_rows=1000, iterations=10, seed=0)
    sizes = np.bincount(assign(x, coarse))
    assert len(coarse) == 3 and sizes.max() > 1000 and len(split) > len(coarse)
    assert np.bincount(assign(x, split)).max() < sizes.max()


def test_verdicts_follow_chains_to_the_kept_key_and_kinds_have_a_priority() -> None:
    verdicts = steps.Verdicts(exact={"a2": ("a", 1.0)}, perceptual={"a": ("b", 0.95)}, final={})
    final = resolve_final(verdicts, later={"b": "c"})
    assert final == {"a": "c", "b": "c"}
    verdicts = steps.Verdicts(exact=verdicts.exact, perceptual=verdicts.perceptual, final=final)
    keys = np.array(["a", "a2", "b", "c", "d"], dtype=object)
    batch = {KEY: keys, SOURCE: keys.copy(), AESTHETIC_SCORE: np.zeros(5, np.float32),
             DEDUP_CLUSTER: np.zeros(5, np.int32), NN_SIMILARITY: np.ones(5, np.float32),
             "semantic_of": np.array(["", "", "c", "", "c"], dtype=object),
             "semantic_similarity": np.array([np.nan, np.nan, 0.97, np.nan, 0.96], np.float32),
             "reference_of": np.array(["", "", "", "", "ref1"], dtype=object),
             "reference_similarity": np.array([np.nan] * 4 + [0.99], np.float32)}  # fmt: skip
    rows = {r["key"]: r for r in steps.verdict_table(batch, verdicts).to_pylist()}
    assert (rows["a2"]["dedup_kind"], rows["a2"]["duplicate_of"]) == ("exact", "c")
    assert (rows["a"]["dedup_kind"], rows["a"]["duplicate_of"]) == ("perceptual", "c")
    assert (rows["b"]["dedup_kind"], rows["b"]["duplicate_of"]) == ("semantic", "c")
    assert (
        rows["c"]["duplicate_of"] is None
        and rows["c"]["dedup_kind"] is None
        and rows["c"]["dedup_similarity"] is None
    )
    assert (rows["d"]["dedup_kind"], rows["d"]["duplicate_of"]) == ("reference", "ref1")
    assert steps.nn_histogram(np.array([0.1, 0.6, 0.999, 1.0, np.nan], np.float32)) == [1, 1] + [0] * 38 + [2]
