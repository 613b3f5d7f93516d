"""ValidateSamples: every bad input becomes a reject with its reason, nothing raises, counts add up."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import pipelines.core.validate as validate_module
from pipelines.core.step import object_column
from pipelines.core.validate import ValidateConfig, ValidateSamples
from schemas.columns import (
    CAPTION,
    HEIGHT,
    IMAGE_FORMAT,
    KEY,
    META_JSON,
    REJECT_DETAIL,
    REJECT_REASON,
    REJECT_STEP,
    WIDTH,
)
from tests.pipelines import corrupt

INPUT_COLUMNS = ("key", "source", "caption", "image", "meta_json")


def _accepted(out) -> np.ndarray:
    return np.asarray([not r for r in out[REJECT_REASON]])


def _assert_counts_add_up(batch, out) -> None:
    n = len(batch[KEY])
    assert all(len(v) == n for v in out.values())
    assert _accepted(out).sum() + sum(1 for r in out[REJECT_REASON] if r) == n


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_pixels", 0),
        ("max_pixels", 10**12),
        ("min_side_px", 0),
        ("max_aspect_ratio", 0.5),
        ("max_aspect_ratio", float("nan")),
        ("max_caption_bytes", 0),
        ("allow_empty_caption", "yes"),
        ("formats", ("JPEG", "NOPE")),
        ("formats", ()),
    ],
)
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        ValidateConfig(**{field: value})


def test_config_is_frozen_keyword_only_and_checked():
    cfg = ValidateConfig()
    with pytest.raises(AttributeError):
        cfg.min_side_px = 1
    with pytest.raises(TypeError):
        ValidateConfig(1)
    with pytest.raises(TypeError):
        ValidateSamples({"min_side_px": 8})
    step = ValidateSamples(cfg)
    assert (step.name, step.stateful) == ("validate", False)
    assert set(step.requires) == set(INPUT_COLUMNS)
    assert step.produces == (IMAGE_FORMAT, WIDTH, HEIGHT)


def test_every_corrupt_case_gets_its_documented_outcome():
    cases = corrupt.cases()
    assert [c.name for c in cases] == list(corrupt.EXPECTED)
    batch = corrupt.batch()
    out = ValidateSamples(ValidateConfig())(batch)
    _assert_counts_add_up(batch, out)
    for i, case in enumerate(cases):
        assert out[REJECT_REASON][i] == case.reason, (case.name, out[REJECT_DETAIL][i])
        if case.reason:
            assert out[REJECT_STEP][i] == "validate"
            assert (out[WIDTH][i], out[HEIGHT][i], out[IMAGE_FORMAT][i]) == (0, 0, "")
        else:
            assert (out[WIDTH][i], out[HEIGHT][i]) == case.size, case.name
            assert out[IMAGE_FORMAT][i] == case.ext.replace("jpg", "jpeg")
            assert out[REJECT_STEP][i] == out[REJECT_DETAIL][i] == ""
    assert Counter(out[REJECT_REASON]) == corrupt.expected_counts()


def test_output_keeps_columns_and_converts_to_arrow():
    batch = corrupt.batch()
    out = ValidateSamples(ValidateConfig())(batch)
    assert set(out) == {
        *INPUT_COLUMNS,
        IMAGE_FORMAT,
        WIDTH,
        HEIGHT,
        REJECT_STEP,
        REJECT_REASON,
        REJECT_DETAIL,
    }
    assert all(isinstance(c, str) for c in out[CAPTION]) and all(isinstance(m, str) for m in out[META_JSON])
    assert out[CAPTION][0] == corrupt.GOOD_CAPTION
    assert out[WIDTH].dtype == np.int64
    table = pa.table({k: list(v) if v.dtype == object else v for k, v in out.items()})
    assert table.num_rows == len(batch[KEY])


def test_allow_empty_caption():
    """Caption-less samples (no .txt: clip-retrieval style) and blank captions get the empty caption."""
    out = ValidateSamples(ValidateConfig(allow_empty_caption=True))(corrupt.batch())
    reasons = dict(zip(corrupt.EXPECTED, out[REJECT_REASON], strict=True))
    captions = dict(zip(corrupt.EXPECTED, out[CAPTION], strict=True))
    for name in ("caption_missing", "caption_empty", "caption_whitespace"):
        assert (reasons[name], captions[name]) == ("", ""), name
    assert captions["good_jpeg"] == corrupt.GOOD_CAPTION
    out = ValidateSamples(ValidateConfig())(corrupt.batch())
    reasons = dict(zip(corrupt.EXPECTED, out[REJECT_REASON], strict=True))
    assert (
        reasons["caption_missing"] == "missing caption" and reasons["caption_whitespace"] == "empty caption"
    )


def test_bad_keys_captions_and_metadata():
    good = corrupt.good_jpeg()
    rows = [
        (None, "ok", good, "{}"),
        ("a", "ok".encode("utf-16"), good, "{}"),
        ("b", "bad \udcff surrogate", good, "{}"),
        ("c", "\ufeffwith BOM".encode(), good, "{}"),
        ("d", "ok", good, "not json"),
        ("e", "ok", good, "[1, 2]"),
        ("f", "ok", good, None),
        ("g", "ok", "not bytes", "{}"),
        ("h", 42, good, "{}"),
        ("i", "x" * 10, good, b'{"k": 1}'),
    ]
    batch = {
        "key": object_column(r[0] for r in rows),
        "source": object_column(["test"] * len(rows)),
        "caption": object_column(r[1] for r in rows),
        "image": object_column(r[2] for r in rows),
        "meta_json": object_column(r[3] for r in rows),
    }
    out = ValidateSamples(ValidateConfig(max_caption_bytes=9))(batch)
    assert list(out[REJECT_REASON]) == [
        "missing key",
        "caption not utf-8",
        "caption not utf-8",
        "",
        "bad meta json",
        "bad meta json",
        "bad meta json",
        "not an image",
        "caption not text",
        "caption too long",
    ]
    assert out[CAPTION][3] == "with BOM"


def test_rows_rejected_earlier_are_left_alone():
    batch = corrupt.batch()
    batch[REJECT_STEP] = object_column(["dedupe"] + [""] * (len(batch[KEY]) - 1))
    batch[REJECT_REASON] = object_column(["seen in an earlier shard"] + [""] * (len(batch[KEY]) - 1))
    batch[REJECT_DETAIL] = object_column([""] * len(batch[KEY]))
    for column in batch.values():
        column.setflags(write=False)  # Ray may hand out read-only arrays
    out = ValidateSamples(ValidateConfig())(batch)
    assert (out[REJECT_STEP][0], out[REJECT_REASON][0], out[WIDTH][0]) == (
        "dedupe",
        "seen in an earlier shard",
        0,
    )
    zero = list(corrupt.EXPECTED).index("zero_byte")
    assert out[REJECT_REASON][zero] == "empty file"
    assert batch[REJECT_REASON][zero] == ""  # the input was not modified


def test_first_accepted_duplicate_wins():
    bad, good = corrupt.truncated_jpeg(), corrupt.good_jpeg()
    batch = {
        "key": object_column(["k", "k", "k"]),
        "source": object_column(["s"] * 3),
        "caption": object_column(["c"] * 3),
        "image": object_column([bad, good, good]),
        "meta_json": object_column(["{}"] * 3),
    }
    out = ValidateSamples(ValidateConfig())(batch)
    assert list(out[REJECT_REASON]) == ["truncated image", "", "duplicate key"]


def test_unexpected_errors_become_rejects(monkeypatch):
    calls = []

    def flaky(data, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("decoder exploded")
        return np.zeros((24, 32, 3), np.uint8)

    monkeypatch.setattr(validate_module, "decode_rgb", flaky)
    batch = corrupt.batch(tuple(c for c in corrupt.cases() if c.reason == "")[:3])
    out = ValidateSamples(ValidateConfig())(batch)
    assert list(out[REJECT_REASON]) == ["", "unexpected error", ""]
    assert out[REJECT_DETAIL][1] == "RuntimeError: decoder exploded"


def test_missing_columns_are_a_plan_error():
    batch = corrupt.batch()
    del batch[META_JSON]
    with pytest.raises(ValueError, match="meta_json"):
        ValidateSamples(ValidateConfig())(batch)


def test_tar_generators():
    data = corrupt.samples_tar()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        names = tar.getnames()
        assert tar.extractfile("html_named_jpg.jpg").read().startswith(b"<!DOCTYPE html>")
        assert tar.extractfile("zero_byte.jpg").read() == b""
        assert tar.extractfile("caption_not_utf8.txt").read() == b"\xff\xfe\xfa"
    assert "missing_image.jpg" not in names and "caption_missing.txt" not in names
    first, second = (i for i, n in enumerate(names) if n == f"{corrupt.DUPLICATE_KEY}.jpg")
    assert any(not n.startswith(corrupt.DUPLICATE_KEY) for n in names[first:second])  # not one group

    seen = []
    with (
        pytest.raises(tarfile.ReadError),
        tarfile.open(fileobj=io.BytesIO(corrupt.corrupt_tar()), mode="r|") as tar,
    ):
        for member in tar:
            tar.extractfile(member).read()
            seen.append(member.name)
    complete = {name.split(".")[0] for name in seen if name.endswith(".json")}
    assert complete == set(corrupt.CORRUPT_TAR_COMPLETE)


def _real_batch(test_data):
    rows = pq.read_table(test_data / "fondant_cc_web_sample.parquet").to_pylist()
    batch = {
        "key": object_column(r["id"] for r in rows),
        "source": object_column(["fondant-cc-web"] * len(rows)),
        "caption": object_column(r["alt_text"] for r in rows),
        "image": object_column(r["data"] for r in rows),
        "meta_json": object_column(json.dumps({"license": r["license_type"], "url": r["url"]}) for r in rows),
    }
    return rows, batch


def test_real_messy_web_images(test_data):
    rows, batch = _real_batch(test_data)
    out = ValidateSamples(ValidateConfig())(batch)
    _assert_counts_add_up(batch, out)
    empty = [not r["alt_text"].strip() for r in rows]
    assert [r == "empty caption" for r in out[REJECT_REASON]] == empty  # the web's many empty alt texts
    assert set(out[REJECT_REASON]) == {"", "empty caption"}

    out = ValidateSamples(ValidateConfig(allow_empty_caption=True))(batch)
    assert _accepted(out).all()
    assert out[WIDTH].tolist() == [r["width"] for r in rows]
    assert out[HEIGHT].tolist() == [r["height"] for r in rows]
    assert set(out[IMAGE_FORMAT]) == {"jpeg"}


def test_real_images_under_strict_size_rules(test_data):
    rows, batch = _real_batch(test_data)
    cfg = ValidateConfig(min_side_px=256, max_aspect_ratio=2.5, allow_empty_caption=True)
    out = ValidateSamples(cfg)(batch)
    _assert_counts_add_up(batch, out)
    for row, reason, width in zip(rows, out[REJECT_REASON], out[WIDTH], strict=True):
        w, h = row["width"], row["height"]
        expected = (
            "too small" if min(w, h) < 256 else "extreme aspect ratio" if max(w, h) / min(w, h) > 2.5 else ""
        )
        assert reason == expected, row["id"]
        assert width == (w if not expected else 0)
    counts = Counter(out[REJECT_REASON])
    assert counts["too small"] > 20 and counts[""] >= 6
