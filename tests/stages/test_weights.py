"""Weights files that do not fit are refused with a message naming the file and the offending keys."""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import save_file

from stages.previewer import FLAVORS, Previewer
from stages.weights import WeightsError, load_weights, read_safetensors, save_weights, sha256_of


@pytest.fixture
def model() -> Previewer:
    return Previewer(FLAVORS["previewer/tiny"])


def test_missing_keys(model, tmp_path) -> None:
    state = dict(model.state_dict())
    dropped = sorted(state)[:3]
    for k in dropped:
        del state[k]
    path = tmp_path / "missing.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    with pytest.raises(WeightsError, match=r"missing\.safetensors") as err:
        load_weights(model, path)
    assert "3 missing keys" in str(err.value) and dropped[0] in str(err.value)


def test_unexpected_keys_and_wrong_shapes(model, tmp_path) -> None:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["extra.weight"] = torch.zeros(2)
    state["blocks.0.weight"] = torch.zeros(1, 1, 1, 1)
    path = tmp_path / "odd.safetensors"
    save_file(state, path)
    with pytest.raises(WeightsError) as err:
        load_weights(model, path)
    message = str(err.value)
    assert "odd.safetensors" in message and "1 unexpected keys: extra.weight" in message
    assert "1 wrong shapes: blocks.0.weight (file (1, 1, 1, 1) vs model" in message


def test_pickle_is_refused_before_torch_sees_it(model, tmp_path) -> None:
    path = tmp_path / "previewer.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(WeightsError, match=r"previewer\.pt: this is a pickle"):
        load_weights(model, path)
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps({"a": 1}, protocol=4))
    with pytest.raises(WeightsError, match=r"raw\.pkl: this is a pickle"):
        read_safetensors(raw)


def test_not_safetensors(model, tmp_path) -> None:
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(b"this is not a weights file at all")
    with pytest.raises(WeightsError, match=r"garbage\.safetensors: not a valid safetensors file"):
        load_weights(model, path)


def test_round_trip_and_sha(model, tmp_path) -> None:
    path = tmp_path / "ok.safetensors"
    sha = save_weights(model.state_dict(), path)
    assert sha == sha256_of(path) == read_safetensors(path).sha256
    fresh = Previewer(FLAVORS["previewer/tiny"])
    assert load_weights(fresh, f"file://{path}") == sha
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())


def test_meta_model_assign(model, tmp_path) -> None:
    path = tmp_path / "ok.safetensors"
    save_weights(model.state_dict(), path, dtype=torch.bfloat16)
    with torch.device("meta"):
        meta = Previewer(FLAVORS["previewer/tiny"])
    load_weights(meta, path, assign=True)
    assert not any(p.is_meta for p in meta.parameters())
    assert meta.blocks[0].weight.dtype == torch.bfloat16
