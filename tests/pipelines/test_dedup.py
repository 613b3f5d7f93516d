"""``cascade dedup`` on a local Ray: planted copies of real photos (exact and perceptual, measured per transform),
synthetic CLIP-L-sized embeddings (semantic, against all-pairs ground truth), the same output whatever the
workers and batch sizes, a killed run redone to the same output, the reference set, and filter rules on it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from benchmarks.dedup_data import write_scores
from pipelines.core.shards import members_tar_bytes
from pipelines.core.sources import SourceConfig
from pipelines.core.step import Resources
from pipelines.dedup.pipeline import DedupConfig, PerceptualConfig, ReferenceConfig, SemanticConfig, run_dedup
from pipelines.filter.pipeline import FilterConfig, Rule, run_filter
from pipelines.ingest.existing import IngestConfig, run_ingest
from pipelines.score.pipeline import ScoreConfig, ScorerConfig, run_score
from tests.browser import open_page
from tests.faults.test_driver_kill import cascade, kill_when, rerun
from tests.pipelines.planted import measure, planted

EXACT_TRANSFORMS = ("resize_half", "resize_quarter", "jpeg_q30", "colour_jitter")  # pHash moves them 0-6 bits


def table(output: Path) -> list[dict]:
    """The dedup rows, NaN written as "nan" so that rows compare equal."""
    rows = pq.read_table(output / "parquet").to_pylist()
    return [{k: "nan" if isinstance(v, float) and np.isnan(v) else v for k, v in r.items()} for r in rows]


@pytest.fixture(scope="module")
def photos_scored(ray_local, tmp_path_factory) -> Path:
    """The planted set (17 real photos × 9 variants) in 3 shards, ingested and scored (tiny CLIP)."""
    root = tmp_path_factory.mktemp("dedup_photos")
    samples, keys = planted(), sorted(planted())
    (root / "src").mkdir()
    for s in range(3):
        members = ((k, {"jpg": samples[k][0], "txt": b"a photograph"}) for k in keys[s::3])
        (root / "src" / f"{s:05d}.tar").write_bytes(members_tar_bytes(members))
    run_ingest(IngestConfig(source=SourceConfig(kind="webdataset", path=str(root / "src")),
                            output_dir=str(root / "shards")))  # fmt: skip
    run_score(ScoreConfig(shards=SourceConfig(kind="webdataset", path=str(root / "shards")),
                          output_dir=str(root / "scores"), scorer=ScorerConfig(flavor="clip_score/tiny")))  # fmt: skip
    return root


def test_planted_copies_of_real_photos_exact_and_perceptual(photos_scored) -> None:
    """Exact and perceptual at the default thresholds, on real photos. Semantic is off here: the tiny CLIP has
    random weights, under which every photo looks alike; its numbers need the released ViT-L/14 weights."""
    root = photos_scored
    summary = run_dedup(DedupConfig(scores_dir=str(root / "scores"), output_dir=str(root / "dedup"),
                                    semantic=SemanticConfig(enabled=False)))  # fmt: skip
    rows = table(root / "dedup")
    measured = measure(rows)
    print(json.dumps(measured, indent=1))  # the numbers for the closing note (pytest -s)
    assert summary.n_input == len(planted()) == 153 and summary.removed["exact"] == 17
    assert measured["precision"]["exact"]["precision"] == 1.0 and measured["recall"]["exact"]["recall"] == 1.0
    assert measured["precision"]["perceptual"]["precision"] == 1.0
    for transform in EXACT_TRANSFORMS:
        assert measured["recall"][transform]["recall"] == 1.0, transform
    assert measured["recall"]["text_overlay"]["recall"] >= 0.5  # overlays move pHash 2-31 bits
    assert measured["recall"]["hflip"]["recall"] == 0.0  # pHash is not flip-invariant: semantic's job
    report = json.loads((root / "dedup" / "dedup_report.json").read_text())
    assert report["totals"]["n_exact"] == 17 and report["totals"]["n_kept"] == summary.n_kept
    assert {r["dedup_cluster"] for r in rows} == {-1} and all(r["nn_similarity"] == "nan" for r in rows)
    html = (root / "dedup" / "dedup_report.html").read_text()
    assert html.count('<img src="data:image/jpeg;base64,') >= 2 * 8 and "image not found" not in html
    assert (
        "Random weights" in html and "Semantic dedup was off" in html and "Example groups (8, seeded)" in html
    )
    page = open_page(root / "dedup" / "dedup_report.html", root / "dedup_report.png")
    assert len(page.images) >= 16 and all(i["width"] > 0 for i in page.images)  # every thumbnail renders
    assert "exact · 1.000" in page.text and "perceptual · " in page.text
    scores = pq.read_table(root / "scores" / "parquet", columns=["key", "image_sha256", "phash"]).to_pylist()
    assert len({r["image_sha256"] for r in scores}) == 153 - 17  # the exact copies share their bytes' sha256

    # filter on the dedup output next to the scores; its report counts what each kind removed
    kept = run_filter(FilterConfig(scores_dir=str(root / "scores"), output_dir=str(root / "kept"),
                                   dedup_dir=str(root / "dedup"),
                                   rules=(Rule(field="duplicate_of", op="is null"),)))  # fmt: skip
    assert kept.n_kept == summary.n_kept
    filter_report = json.loads((root / "kept" / "filter_report.json").read_text())
    assert filter_report["dropped_by_dedup_kind"] == {
        "exact": 17,
        "perceptual": summary.removed["perceptual"],
    }
    only_exact = run_filter(FilterConfig(scores_dir=str(root / "scores"), output_dir=str(root / "kept2"),
                                         dedup_dir=str(root / "dedup"),
                                         rules=(Rule(field="dedup_kind", op="!=", value="exact", keep_missing=True),)))  # fmt: skip
    assert only_exact.n_kept == 153 - 17


SEMANTIC = SemanticConfig(cluster_rows=500, sample_rows=2000)  # about 6 clusters of the 3000 rows


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> tuple[Path, list]:
    root = tmp_path_factory.mktemp("dedup_synthetic")
    pairs = write_scores(root / "scores", 3000, 6, seed=0)
    return root, pairs


def _semantic(root: Path, name: str, **overrides) -> tuple[list[dict], object]:
    config = DedupConfig(scores_dir=str(root / "scores"), output_dir=str(root / name), exact=False,
                         perceptual=PerceptualConfig(enabled=False), **{"semantic": SEMANTIC} | overrides)  # fmt: skip
    summary = run_dedup(config)
    return table(root / name), summary


@pytest.fixture(scope="module")
def semantic_run(ray_local, synthetic) -> tuple[list[dict], object]:
    """The default-resources run every other semantic test compares with."""
    return _semantic(synthetic[0], "semantic")


def test_semantic_finds_the_eps_pairs_of_all_pairs_search(synthetic, semantic_run) -> None:
    """SemDeDup against exact all-pairs search on 3000 768-d embeddings: every planted copy (cosine 0.985) is
    removed, no decoy (cosine 0.9) is, and ε-pairs are recalled within clusters."""
    root, pairs = synthetic
    rows, summary = semantic_run
    assert summary.n_clusters >= 6 and summary.n_input == 3000
    by_key = {r["key"]: r for r in rows}
    final = {k: r["duplicate_of"] or k for k, r in by_key.items()}
    assert all(final[a] == final[b] for a, b in pairs)
    x = np.concatenate([np.asarray(pq.read_table(p, columns=["clip_image_embeds"])["clip_image_embeds"].to_pylist(),
                                   np.float32) for p in sorted((root / "scores" / "parquet").glob("*.parquet"))])  # fmt: skip
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sims = x @ x.T
    keys = sorted(by_key)
    truth = np.argwhere(np.triu(sims >= 0.95, 1))
    recall = np.mean([final[keys[i]] == final[keys[j]] for i, j in truth])
    assert recall >= 0.98
    removed = [r for r in rows if r["dedup_kind"]]
    assert all(r["dedup_kind"] == "semantic" and r["dedup_similarity"] >= 0.95 for r in removed)
    assert len(removed) == len(pairs)  # the decoys (cosine 0.9) stay
    np.fill_diagonal(sims, -1)
    nn = np.asarray([by_key[k]["nn_similarity"] for k in keys], dtype=float)  # "nan": a cluster of one
    # the nearest neighbour is mostly in the row's cluster (float16 through the shuffle: within 1e-4)
    assert np.mean(np.abs(nn - sims.max(axis=1)) < 1e-4) >= 0.9
    html = (root / "semantic" / "dedup_report.html").read_text()
    assert f"nearest-neighbour cosine (n={np.isfinite(nn).sum():,})" in html and "1 − epsilon = 0.950" in html
    report = json.loads((root / "semantic" / "dedup_report.json").read_text())
    assert sum(report["nn_histogram"]["counts"]) == np.isfinite(nn).sum()
    assert report["n_clusters"] == summary.n_clusters


def test_same_output_for_any_workers_and_batch_sizes(synthetic, semantic_run) -> None:
    root, _ = synthetic
    other, _ = _semantic(root, "semantic_3", semantic=dataclasses.replace(SEMANTIC, block_rows=77),
                         partition_rows=700, read_resources=Resources(batch_size=1, concurrency=3),
                         group_resources=Resources(concurrency=3, num_cpus=0.5))  # fmt: skip
    assert other == semantic_run[0]


def test_reference_set_is_kept_out(ray_local, synthetic, tmp_path) -> None:
    """Rows within epsilon of a reference set (here: another scores output holding copies of 5 rows) are
    removed as ``reference`` whatever else they are."""
    root, _ = synthetic
    picked = pq.read_table(root / "scores" / "parquet" / "00002.parquet").slice(10, 5)
    write_scores(tmp_path / "reference", 20, 1, seed=9)  # a valid scores output; then 5 of our rows into it
    ref_file = tmp_path / "reference" / "parquet" / "00000.parquet"
    ref = pq.read_table(ref_file)
    pq.write_table(pa.concat_tables([ref.slice(0, 15), picked.cast(ref.schema)]), ref_file)
    rows, summary = _semantic(root, "with_reference", reference=ReferenceConfig(scores_dir=str(tmp_path / "reference")))  # fmt: skip
    matched = {r["key"]: r["duplicate_of"] for r in rows if r["dedup_kind"] == "reference"}
    assert set(picked["key"].to_pylist()) <= set(matched) and summary.removed["reference"] == len(matched)
    assert all(matched[k] == k for k in picked["key"].to_pylist())  # the reference row has the same key here


@pytest.mark.timeout(600)
def test_killed_mid_job_and_rerun_gives_the_same_output(synthetic, semantic_run, tmp_path) -> None:
    root, _ = synthetic
    out = tmp_path / "dedup"
    settings = (f"scores_dir={root / 'scores'}", f"output_dir={out}", "exact=false", "perceptual.enabled=false",
                "semantic.cluster_rows=500", "semantic.sample_rows=2000")  # fmt: skip
    # killed once the verdicts are found and the shards start to commit (the stats are written just before)
    kill_when(cascade("dedup", *settings, "group_resources.concurrency=1"),
              lambda: (out / "_commits" / "_dedup_stats.json").exists())  # fmt: skip
    assert not (out / "manifest.json").exists()
    rerun(cascade("dedup", *settings, "semantic.block_rows=100"))
    assert table(out) == semantic_run[0]


def test_config_and_input_errors_name_the_field(tmp_path) -> None:
    with pytest.raises(ValueError, match="all off"):
        DedupConfig(scores_dir="s", output_dir="o", exact=False, perceptual=PerceptualConfig(enabled=False),
                    semantic=SemanticConfig(enabled=False))  # fmt: skip
    with pytest.raises(ValueError, match=r"reference needs semantic\.enabled"):
        DedupConfig(scores_dir="s", output_dir="o", semantic=SemanticConfig(enabled=False),
                    reference=ReferenceConfig(scores_dir="r"))  # fmt: skip
    with pytest.raises(ValueError, match=r"epsilon=1.5"):
        SemanticConfig(epsilon=1.5)
    with pytest.raises(ValueError, match=r"bands=1 must be in 2..32"):
        PerceptualConfig(bands=1)
    with pytest.raises(ValueError, match=r"rules on \['duplicate_of'\] need dedup_dir"):
        FilterConfig(scores_dir="s", output_dir="o", rules=(Rule(field="duplicate_of", op="is null"),))
    write_scores(tmp_path / "old", 10, 1, version=1)
    with pytest.raises(ValueError, match=r"scores_dir=.* is scores@1, scored before image_sha256 and phash"):
        run_dedup(DedupConfig(scores_dir=str(tmp_path / "old"), output_dir=str(tmp_path / "o")))
