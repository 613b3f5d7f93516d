"""Stage B conditioning latents in `cascade encode`: exact values, subset, config errors, metadata, export."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TVF

from pipelines.core.images import decode_rgb, to_float_chw
from pipelines.core.latents_reader import read_latents
from pipelines.core.preprocess import PreprocessConfig, crop_for_stage_a
from pipelines.core.sources import SourceConfig, unique_shards
from pipelines.core.step import object_column, with_reject_columns
from pipelines.encode import stage_b
from pipelines.encode.models import EffnetStageBConfig, EncodeEffnetStageB, EncoderConfig
from pipelines.encode.pipeline import EncodeConfig, encode_plan, preprocessing_spec, run_encode, write_config
from pipelines.encode.steps import PIXELS, STAGE_A_PIXELS, STAGE_B_FLAT
from pipelines.export.pipeline import ExportConfig, run_export
from schemas import STAGE_B_CONDITIONING_KEY, FileMetadata
from schemas import columns as c
from schemas.records import latents_schema
from schemas.tensors import tensor_to_numpy
from stages.flavors import build_model
from tests.pipelines.photos import jpeg, photo_tar
from tests.tiny import encoders

NAMES = ("chelsea", "coffee", "camera")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage_b_shards")
    (root / "00000.tar").write_bytes(photo_tar(NAMES))
    return root


def _config(shards, out, stage_a_px: int = 128, **overrides) -> EncodeConfig:
    fields = encoders() | {
        "preprocess": PreprocessConfig(image_size_px=128, stage_a_size_px=stage_a_px),
        "stage_a": EncoderConfig(flavor="stage_a/tiny"),
    }
    return EncodeConfig(
        shards=SourceConfig(kind="webdataset", path=str(shards)), output_dir=str(out), **(fields | overrides)
    )


@pytest.fixture(scope="module")
def exact(ray_local, shards, tmp_path_factory):
    """Stage A at 128 px (n = 4 cells), exact conditioning: sizes 2 and 3, fp16, both formats."""
    config = _config(shards, tmp_path_factory.mktemp("stage_b") / "exact", stage_b_conditioning="exact")
    summary = run_encode(config)
    assert summary.n_encoded == len(NAMES)
    return config


@pytest.fixture(scope="module")
def subset(shards, tmp_path_factory):
    """Stage A at 256 px (n = 8 cells), subset (4, 6), effnet under bf16 autocast, Parquet only: the encode
    plan run in-process (``Plan.run_local``, no Ray; the exact case runs the real job), parts left staged."""
    config = _config(shards, tmp_path_factory.mktemp("stage_b") / "subset", stage_a_px=256,
                     stage_b_conditioning="subset", stage_b_cells=(4, 6), formats=("parquet",),
                     effnet=EncoderConfig(flavor="effnet/tiny", bf16_autocast=True))  # fmt: skip
    shard = next(iter(unique_shards(config.shards).values()))
    plan = encode_plan(config, write_config(config))
    summary = plan.run_local({"shard_index": np.array([0]), "uris": object_column([shard["uris"]])})
    assert sum(json.loads(counts).get("n_encoded", 0) for counts in summary["counts"]) == len(NAMES)
    return config


def _expected(config: EncodeConfig, name: str, cells: int) -> np.ndarray:
    """Independently: effnet.encode(resize(stage_a_crop, (32s, 32s), NEAREST)), cast to the storage dtype."""
    image = torch.from_numpy(to_float_chw(decode_rgb(jpeg(name), max_pixels=10**8)))
    crop = crop_for_stage_a(image, config.preprocess).pixels
    effnet, _ = build_model("effnet/tiny")
    side = 32 * cells
    resized = TVF.resize(crop[None], [side, side], interpolation=InterpolationMode.NEAREST, antialias=False)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.effnet.bf16_autocast):
        latent = effnet.encode(resized)[0]
    return latent.float().half().numpy()


def _parquet_rows(out) -> dict[str, dict[str, np.ndarray]]:
    rows = {}
    for path in sorted(out.rglob("parquet/*/*.parquet")):  # committed, or staged (the in-process run)
        table = pq.read_table(path)
        for name in table.column_names:
            if name.startswith(c.STAGE_B_EFFNET_PREFIX):
                for key, value in zip(table["key"].to_pylist(), tensor_to_numpy(table[name]), strict=True):
                    rows.setdefault(key, {})[name] = value
    return rows


def test_exact_stores_every_drawn_size_bit_for_bit(exact) -> None:
    from pathlib import Path

    out = Path(exact.output_dir)
    parquet = _parquet_rows(out)
    wds = {k: {n: v[i] for n, v in b.items()} for b in read_latents(str(out), "webdataset") for i, k in enumerate(b["key"])}  # fmt: skip
    assert set(parquet) == set(wds) == set(NAMES)
    for name in NAMES:
        assert sorted(parquet[name]) == ["stage_b_effnet_2", "stage_b_effnet_3"]
        for cells in (2, 3):
            column = c.stage_b_effnet_column(cells)
            expected = _expected(exact, name, cells)
            assert parquet[name][column].dtype == np.float16 and expected.shape == (16, cells, cells)
            assert np.array_equal(parquet[name][column], expected), (name, cells)
            assert np.array_equal(wds[name][column], expected), (name, cells)
        assert wds[name]["stage_a"].shape == (4, 32, 32)
    # the default with Stage A on is exact
    assert _config("x", "y").stored_stage_b_cells == (2, 3) and _config("x", "y").stage_b_mode == "exact"


def test_subset_stores_only_the_given_sizes_under_autocast(subset) -> None:
    from pathlib import Path

    rows = _parquet_rows(Path(subset.output_dir))
    assert set(rows) == set(NAMES)
    for name in NAMES:
        assert sorted(rows[name]) == ["stage_b_effnet_4", "stage_b_effnet_6"]
        for cells in (4, 6):
            assert np.array_equal(rows[name][c.stage_b_effnet_column(cells)], _expected(subset, name, cells))
    staged = sorted(str(p) for p in Path(subset.output_dir).rglob("*.parquet"))
    columns = next(read_latents(staged, columns=["stage_b_effnet_6", "effnet"]))
    assert list(columns) == ["key", "effnet", "stage_b_effnet_6"]


def test_metadata_records_mode_cells_and_bytes(exact, subset) -> None:
    from pathlib import Path

    out = Path(exact.output_dir)
    manifest = json.loads((out / "manifest.json").read_text())
    recorded = manifest["stage_b_conditioning"]
    assert (recorded["mode"], recorded["cells"], recorded["bytes_per_sample"]) == (
        "exact",
        [2, 3],
        16 * 13 * 2,
    )
    assert recorded["columns"] == ["stage_b_effnet_2", "stage_b_effnet_3"] and recorded["stage_a_cells"] == 4
    assert recorded["encoder_role"] == "effnet" and manifest["encoder_flavors"]["effnet"] == "effnet/tiny"
    assert manifest["preprocessing"]["stage_b_conditioning"]["cells"] == [2, 3]
    shapes = next(iter(manifest["buckets"].values()))
    assert {k: v["shape"] for k, v in shapes.items() if k.startswith("stage_b")} == {
        "stage_b_effnet_2": [16, 2, 2],
        "stage_b_effnet_3": [16, 3, 3],
    }
    tar = next((out / "webdataset").glob("*/*.tar"))  # webdataset/{bucket}/...
    with tarfile.open(tar) as f:
        header = json.loads(f.extractfile(f.getmembers()[0]).read())  # each sample's json holds the metadata
    assert header[STAGE_B_CONDITIONING_KEY] == recorded
    for config, wanted in ((exact, recorded), (subset, None)):
        meta = FileMetadata.from_arrow(
            pq.read_schema(next(Path(config.output_dir).rglob("*.parquet"))).metadata
        )
        assert dict(meta.stage_b_conditioning) == (wanted or config.stage_b_metadata())
        assert c.stage_b_cells_of(meta.tensor_shapes) == config.stored_stage_b_cells
    assert subset.stage_b_metadata()["bytes_per_sample"] == 16 * (16 + 36) * 2
    assert subset.stage_b_metadata()["mode"] == "subset"
    # 1024 px, fp16: exact 16..31 and the default subset (16, 24, 31)
    assert stage_b.cell_range(32) == tuple(range(16, 32)) and stage_b.default_subset(32) == (16, 24, 31)
    assert stage_b.bytes_per_sample(range(16, 32), 16, "float16") == 293_632
    assert stage_b.bytes_per_sample((16, 24, 31), 16, "float16") == 57_376


def test_export_leaves_stage_b_out_unless_named(exact, tmp_path) -> None:
    default = run_export(ExportConfig(latents=exact.output_dir, output_dir=str(tmp_path / "a")))
    assert not [n for n in pq.read_schema(default.files[0]).names if n.startswith("stage_b")]
    named = run_export(ExportConfig(latents=exact.output_dir, output_dir=str(tmp_path / "b"),
                                    columns=("effnet", "stage_b_effnet_3")))  # fmt: skip
    table = pq.read_table(named.files[0])
    assert "stage_b_effnet_3" in table.column_names and "stage_b_effnet_2" not in table.column_names
    model = json.loads(table.schema.metadata[b"cascade.model"])
    assert model["tensors"]["stage_b_effnet_3"]["shape"] == [16, 3, 3]
    assert model["stage_b_conditioning"]["mode"] == "exact"


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"stage_a": None, "stage_b_conditioning": "exact"}, r"stage_b_conditioning='exact' needs Stage A"),
        ({"stage_a": None, "stage_b_conditioning": "subset"}, r"stage_b_conditioning='subset' needs Stage A"),
        ({"stage_b_conditioning": "always"}, r"stage_b_conditioning='always'; allowed: exact, subset, none"),
        ({"stage_b_conditioning": "subset", "stage_b_cells": (1, 3)}, r"stage_b_cells=\[1, 3\]: \[1\] outside \[2, 3\]"),
        ({"stage_b_conditioning": "subset", "stage_b_cells": (3, 2)}, r"stage_b_cells=\[3, 2\] must be ascending"),
        ({"stage_b_conditioning": "subset", "stage_b_cells": (2, 2)}, r"stage_b_cells=\[2, 2\] must be ascending"),
        ({"stage_b_conditioning": "subset", "stage_b_cells": ()}, r"stage_b_cells=\(\) must be a non-empty"),
        ({"stage_b_cells": (2,)}, r"stage_b_cells=\(2,\) applies only to stage_b_conditioning='subset'"),
        ({"preprocess": PreprocessConfig(stage_a_size_px=32)}, r"preprocess\.stage_a_size_px=32"),
    ],
)  # fmt: skip
def test_config_errors_name_the_field(tmp_path, overrides, match) -> None:
    with pytest.raises(ValueError, match=match):
        _config(tmp_path, tmp_path, **overrides)


def test_none_and_no_stage_a_keep_the_preprocessing_hash(tmp_path) -> None:
    without = EncodeConfig(
        shards=SourceConfig(kind="webdataset", path=str(tmp_path)), output_dir=str(tmp_path), **encoders()
    )
    assert without.stage_b_mode == "none" and without.stored_stage_b_cells == ()
    none = _config(tmp_path, tmp_path, stage_b_conditioning="none")
    assert "stage_b_conditioning" not in preprocessing_spec(none) and none.stage_b_metadata() == {}
    subset = _config(tmp_path, tmp_path, stage_a_px=1024, stage_b_conditioning="subset")
    assert subset.stored_stage_b_cells == (16, 24, 31)
    assert subset.stage_b_metadata()["bytes_per_sample"] == 57_376


def test_step_on_a_plain_batch_skips_rejected_rows() -> None:
    rng = np.random.default_rng(0)
    batch = with_reject_columns({
        c.KEY: object_column(["a", "b"]),
        PIXELS: object_column(rng.random((3, 64, 64), dtype=np.float32) for _ in range(2)),
        STAGE_A_PIXELS: object_column(rng.random((3, 128, 128), dtype=np.float32) for _ in range(2)),
    })  # fmt: skip
    batch[c.REJECT_REASON][1] = "decode error"
    out = EncodeEffnetStageB(EffnetStageBConfig.of(EncoderConfig(flavor="effnet/tiny"), (2, 3)))(batch)
    assert out[STAGE_B_FLAT][0].shape == (16 * (4 + 9),) and out[STAGE_B_FLAT][1].shape == (0,)
    assert out[c.EFFNET][0].shape == (16, 2, 2) and out[c.EFFNET][1].shape == (0, 0, 0)


def test_column_names_and_sizes() -> None:
    assert (
        c.stage_b_effnet_column(16) == "stage_b_effnet_16"
        and c.stage_b_effnet_cells("stage_b_effnet_16") == 16
    )
    assert [c.stage_b_effnet_cells(n) for n in ("stage_b_effnet_01", "stage_b_effnet_", "effnet")] == [
        None
    ] * 3
    assert stage_b.cell_range(32) == tuple(range(16, 32))  # the sizes ⌊32·U(0.5, 1)⌋ takes (stages.objective)
    shapes = {c.EFFNET: (16, 4, 4), c.CLIP_TEXT: (77, 8), c.CLIP_TEXT_POOLED: (1, 8), c.CLIP_IMG: (8,)}
    schema = latents_schema(shapes | {"stage_b_effnet_3": (16, 3, 3), "stage_b_effnet_2": (16, 2, 2)})
    assert schema.arrow.names[-2:] == ["stage_b_effnet_2", "stage_b_effnet_3"]  # after the others, ascending
    with pytest.raises(
        ValueError, match=r"shapes\['stage_b_effnet_3'\]=\(16, 2, 2\) must be \(channels, 3, 3\)"
    ):
        latents_schema(shapes | {"stage_b_effnet_3": (16, 2, 2)})
