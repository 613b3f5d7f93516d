"""Flavors: every released config and its tiny twin; building, counting and loading from any fsspec URL."""

from __future__ import annotations

import fsspec
import pytest
import torch

from stages.flavors import FLAVORS, build_model, find_weights, get_flavor
from stages.weights import WeightsError, save_weights
from tests.helpers import randomize_
from tests.s3 import moto_endpoint

RELEASED_COUNTS = {
    "stage_c/3.6b": 3_589_103_632,
    "stage_c/1b": 1_030_785_040,
    "stage_b/1.5b": 1_562_941_136,
    "stage_b/700m": 699_471_248,
    "stage_a": 18_406_894,
    "effnet": 20_197_968,
    "previewer": 3_979_651,
    "controlnet/canny": 54_255_776,
    "controlnet/inpainting": 54_256_424,
    "controlnet/super_resolution": 203_491_584,
}


def test_every_released_flavor_has_a_tiny_twin() -> None:
    released = [name for name in FLAVORS if not name.endswith("/tiny")]
    assert set(RELEASED_COUNTS) <= set(released)
    for name in released:
        tiny = f"{name}/tiny" if "/" in name and name.split("/")[0] == "controlnet" else None
        tiny = tiny or f"{name.split('/')[0]}/tiny"
        assert tiny in FLAVORS, f"{name} has no tiny flavor ({tiny})"
        assert FLAVORS[tiny].num_params() < 2_000_000


@pytest.mark.parametrize("name", sorted(RELEASED_COUNTS))
def test_exact_counts_on_meta(name: str) -> None:
    assert get_flavor(name).num_params() == RELEASED_COUNTS[name]


def test_random_init_is_seeded_by_flavor_and_keeps_global_rng() -> None:
    """Two Ray actors building the same tiny flavor must hold identical weights."""
    from stages.weights import state_dict_sha256

    before = torch.random.get_rng_state()
    a, b = build_model("stage_c/tiny")[0], build_model("stage_c/tiny")[0]
    assert torch.equal(torch.random.get_rng_state(), before)
    assert state_dict_sha256(a.state_dict()) == state_dict_sha256(b.state_dict())
    text_a, text_b = build_model("clip_text/tiny")[0], build_model("clip_text/tiny")[0]
    assert state_dict_sha256(text_a.state_dict()) == state_dict_sha256(text_b.state_dict())
    assert state_dict_sha256(a.state_dict()) != state_dict_sha256(build_model("stage_b/tiny")[0].state_dict())


def test_unknown_flavor_lists_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown flavor 'stage_c/2b'; known flavors: .*stage_c/1b"):
        get_flavor("stage_c/2b")


def test_build_and_load_from_memory_url() -> None:
    model, sha = build_model("previewer/tiny")
    assert sha is None and not model.training
    url = "memory://weights/previewer.safetensors"
    expected = save_weights(model.state_dict(), url)
    loaded, sha = build_model("previewer/tiny", weights=url)
    assert sha == expected
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_find_weights_uses_official_names(tmp_path) -> None:
    model, _ = build_model("stage_a/tiny")
    save_weights(model.state_dict(), tmp_path / "stage_a.safetensors")
    assert find_weights(get_flavor("stage_a"), tmp_path).endswith("/stage_a.safetensors")
    with pytest.raises(FileNotFoundError, match=r"effnet_encoder\.safetensors"):
        find_weights(get_flavor("effnet"), tmp_path)
    with pytest.raises(ValueError, match="no released weights"):
        find_weights(get_flavor("effnet/tiny"), tmp_path)


def test_wrong_file_for_flavor_is_refused(tmp_path) -> None:
    model, _ = build_model("previewer/tiny")
    path = tmp_path / "previewer.safetensors"
    save_weights(model.state_dict(), path)
    with pytest.raises(WeightsError, match=r"previewer\.safetensors does not fit StageA"):
        build_model("stage_a/tiny", weights=path)


def test_load_from_s3_on_loopback(monkeypatch) -> None:
    with moto_endpoint() as endpoint:
        for key, value in {
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
        }.items():
            monkeypatch.setenv(key, value)
        options = {"endpoint_url": endpoint, "skip_instance_cache": True}
        fsspec.filesystem("s3", **options).mkdir("weights")
        model, _ = build_model("effnet/tiny")
        sha = save_weights(
            model.state_dict(), "s3://weights/effnet_encoder.safetensors", storage_options=options
        )
        url = find_weights(get_flavor("effnet"), "s3://weights", storage_options=options)
        loaded, loaded_sha = build_model("effnet/tiny", weights=url, storage_options=options)
        assert loaded_sha == sha
        x = torch.rand(1, 3, 64, 64)
        with torch.no_grad():
            assert torch.equal(loaded.encode(x), model.encode(x))


WEIGHTED_TINY = sorted(
    n for n, f in FLAVORS.items() if f.tiny and f.family not in ("clip_text", "clip_vision")
)


@pytest.mark.parametrize("name", WEIGHTED_TINY)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strict_safetensors_round_trip(name: str, dtype: torch.dtype, tmp_path) -> None:
    """Every model saves to safetensors (fp32 or bf16) and loads strictly into a meta-built twin."""
    model = randomize_(build_model(name)[0])
    path = tmp_path / "weights.safetensors"
    sha = save_weights(model.state_dict(), path, dtype=dtype)
    loaded, loaded_sha = build_model(name, weights=path)
    assert loaded_sha == sha and not any(t.is_meta for t in loaded.state_dict().values())
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        expected = value.to(dtype).to(value.dtype) if value.is_floating_point() else value
        assert torch.equal(loaded.state_dict()[key], expected), key
