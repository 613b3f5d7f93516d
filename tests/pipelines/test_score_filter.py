"""Score ingested shards with a tiny CLIP on a local Ray, then filter the stored scores."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipelines.core.images import decode_rgb, perceptual_hash, to_float_chw
from pipelines.core.plan import Plan, PlanError, PlannedStep
from pipelines.core.shards import members_tar_bytes
from pipelines.core.sources import SourceConfig
from pipelines.filter.pipeline import FilterConfig, Rule, run_filter
from pipelines.ingest.existing import IngestConfig, run_ingest
from pipelines.score.pipeline import ReadShard, ScoreConfig, ScorerConfig, ScoreSamples, run_score
from tests.pipelines.photos import PHOTOS, captions, jpeg

META = {"chelsea": {"pwatermark": 0.75, "punsafe": 0.125}, "rocket": {"watermark_score": 0.25}}


def _tar(samples: dict[str, tuple[bytes, str, dict]]) -> bytes:
    return members_tar_bytes(
        (key, {"jpg": image, "txt": caption.encode(), "json": json.dumps(meta).encode()})
        for key, (image, caption, meta) in samples.items()
    )


@pytest.fixture(scope="module")
def ingested(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("score")
    (root / "src").mkdir()
    samples = {name: (jpeg(name), captions()[name], META.get(name, {})) for name in PHOTOS}
    (root / "src" / "photos.tar").write_bytes(_tar(samples))
    run_ingest(
        IngestConfig(
            source=SourceConfig(kind="webdataset", path=str(root / "src")), output_dir=str(root / "shards")
        )
    )
    return root


@pytest.fixture(scope="module")
def scored(ingested):
    config = ScoreConfig(
        shards=SourceConfig(kind="webdataset", path=str(ingested / "shards")),
        output_dir=str(ingested / "scores"),
        scorer=ScorerConfig(flavor="clip_score/tiny"),
    )
    summary = run_score(config)
    return summary, pq.read_table(ingested / "scores" / "parquet"), config


def test_scores_per_key(scored) -> None:
    summary, table, _ = scored
    assert (summary.n_scored, summary.n_rejected) == (len(PHOTOS), 0)
    rows = {r["key"]: r for r in table.to_pylist()}
    assert set(rows) == set(PHOTOS)
    chelsea = rows["chelsea"]
    assert (chelsea["width"], chelsea["height"]) == (451, 300)
    assert chelsea["aspect_ratio"] == pytest.approx(451 / 300)
    assert chelsea["caption_length"] == len(captions()["chelsea"])
    assert (chelsea["watermark_probability"], chelsea["nsfw_probability"]) == (0.75, 0.125)
    assert rows["rocket"]["watermark_probability"] == 0.25 and np.isnan(rows["coffee"]["nsfw_probability"])
    assert all(-1 <= r["clip_similarity"] <= 1 and np.isfinite(r["aesthetic_score"]) for r in rows.values())
    assert len(chelsea["clip_image_embeds"]) == 32
    assert table.schema.metadata[b"cascade.schema"] == b"scores@2"
    # what dedup needs, from the same decode: sha256 of the bytes and imagehash's pHash
    assert chelsea["image_sha256"] == hashlib.sha256(jpeg("chelsea")).hexdigest()
    assert chelsea["phash"] == perceptual_hash(decode_rgb(jpeg("chelsea"), max_pixels=10**8)) > 0


def test_stored_embedding_equals_a_direct_scorer_pass(scored) -> None:
    """The pipeline stores exactly what one ClipScorer call gives (Stage C's clip_img for this flavor)."""
    _, table, config = scored
    step = ScoreSamples(config.scorer)
    image = torch.from_numpy(to_float_chw(decode_rgb(jpeg("astronaut"), max_pixels=10**8)))
    direct = step.scorer.score([image], [captions()["astronaut"]])
    row = next(r for r in table.to_pylist() if r["key"] == "astronaut")
    assert np.allclose(row["clip_image_embeds"], direct.image_embeds[0].numpy(), atol=1e-6)
    assert row["aesthetic_score"] == pytest.approx(direct.aesthetic.item(), abs=1e-5)


def test_score_step_loads_weight_files(tmp_path) -> None:
    """A scorer given weight files (the path real ViT-L/14 weights take) scores exactly like the saved one."""
    from stages.scorers import FLAVORS, ClipScorer
    from stages.weights import save_weights

    original = ClipScorer(FLAVORS["clip_score/tiny"], seed=7)
    save_weights(original.clip.state_dict(), tmp_path / "clip.safetensors")
    save_weights(original.aesthetic.state_dict(), tmp_path / "aesthetic.safetensors")
    config = ScorerConfig(flavor="clip_score/tiny", clip_weights=str(tmp_path / "clip.safetensors"),
                          aesthetic_weights=str(tmp_path / "aesthetic.safetensors"))  # fmt: skip
    step = ScoreSamples(config)
    batch = {"key": np.asarray(["coffee"], dtype=object), "source": np.asarray(["s"], dtype=object),
             "caption": np.asarray([captions()["coffee"]], dtype=object),
             "image": np.asarray([jpeg("coffee")], dtype=object), "meta_json": np.asarray(["{}"], dtype=object)}  # fmt: skip
    out = step(batch)
    image = torch.from_numpy(to_float_chw(decode_rgb(jpeg("coffee"), max_pixels=10**8)))
    expected = original.score([image], [captions()["coffee"]])
    assert np.allclose(out["clip_image_embeds"][0], expected.image_embeds[0].numpy(), atol=1e-6)
    assert out["aesthetic_score"][0] == pytest.approx(expected.aesthetic.item(), abs=1e-5)


def test_filter_rules_and_drop_counts(scored, tmp_path) -> None:
    _, table, config = scored
    widths = sorted(table["width"].to_pylist())
    rules = (
        Rule(field="width", op=">=", value=widths[2]),  # drops the narrowest
        Rule(field="watermark_probability", op="<", value=0.5, keep_missing=True),  # drops chelsea
        Rule(field="key", op="not in", value=["camera"]),
    )
    summary = run_filter(FilterConfig(scores_dir=config.output_dir, output_dir=str(tmp_path), rules=rules))
    kept = set(pq.read_table(tmp_path / "parquet")["key"].to_pylist())
    rows = {r["key"]: r for r in table.to_pylist()}
    expected = {k for k, r in rows.items() if r["width"] >= widths[2] and k not in ("chelsea", "camera")}
    assert kept == expected and summary.n_kept == len(expected) and summary.n_input == len(PHOTOS)
    assert summary.failed[rules[0].label] == sum(w < widths[2] for w in widths)
    assert summary.failed[rules[1].label] == 1
    assert sum(summary.dropped_first.values()) == len(PHOTOS) - len(expected)
    report = json.loads((tmp_path / "filter_report.json").read_text())
    assert report["n_kept"] == len(expected)


def test_filter_refuses_unknown_fields_and_ops(scored, tmp_path) -> None:
    _, _, config = scored
    with pytest.raises(ValueError, match="unknown score fields \\['beauty'\\]"):
        run_filter(FilterConfig(scores_dir=config.output_dir, output_dir=str(tmp_path),
                                rules=(Rule(field="beauty", op=">", value=1),)))  # fmt: skip
    with pytest.raises(ValueError, match="op='=~'"):
        Rule(field="caption", op="=~", value="cat")
    with pytest.raises(ValueError, match="needs a list"):
        Rule(field="key", op="in", value="cat")


def test_filter_refuses_files_that_are_not_scores(tmp_path) -> None:
    from pipelines.core.sink import rejects_table

    batch = {"key": np.asarray(["a"], dtype=object), "source": np.asarray(["s"], dtype=object),
             "reject_step": np.asarray(["x"], dtype=object), "reject_reason": np.asarray(["y"], dtype=object),
             "reject_detail": np.asarray([""], dtype=object)}  # fmt: skip
    (tmp_path / "scores").mkdir()
    pq.write_table(rejects_table(batch, np.asarray([0])), tmp_path / "scores" / "part-0.parquet")
    with pytest.raises(ValueError, match=r"part-0\.parquet: file has rejects@1, expected scores@2 or scores@1"):
        run_filter(FilterConfig(scores_dir=str(tmp_path / "scores"), output_dir=str(tmp_path),
                                rules=(Rule(field="width", op=">", value=1),)))  # fmt: skip


def test_plan_checks_columns_and_configs_without_ray() -> None:
    scorer = ScorerConfig(flavor="clip_score/tiny")
    with pytest.raises(
        PlanError, match=r"step 0 \(score\) requires columns \['caption', 'image', 'meta_json'\]"
    ):
        Plan(("key", "source"), [PlannedStep(ScoreSamples, scorer)]).check()
    with pytest.raises(PlanError, match="frozen dataclass"):
        Plan(("shard_index", "uris"), [PlannedStep(ReadShard, {"kind": "webdataset"})]).check()
    with pytest.raises(ValueError, match=r"scorer\.clip_weights and scorer\.aesthetic_weights are required"):
        ScorerConfig(flavor="clip_score/l14")
