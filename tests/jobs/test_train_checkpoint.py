"""A checkpoint cut short (a run killed while Ray Train persisted it) is never resumed from."""

from __future__ import annotations

import fsspec
import torch

from jobs.train_checkpoint import STATE_FILE, complete_state, read_checkpoint, write_checkpoint


def _write(directory) -> None:
    weights = {"generator": {"w": torch.arange(6.0).reshape(2, 3)}}
    optimizer = {
        "state": {"w": {"exp_avg": torch.ones(2, 3), "step": 3}},
        "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99)}],
    }
    write_checkpoint(directory, weights, optimizer, {"step": 8})


def test_complete_checkpoint_reads_back_and_lists_its_file_sizes(tmp_path) -> None:
    _write(tmp_path / "checkpoint_00000008")
    fs = fsspec.filesystem("file")
    state = complete_state(fs, str(tmp_path / "checkpoint_00000008"))
    assert state["step"] == 8 and set(state["files"]) == {"generator.safetensors", "optimizer.safetensors"}
    weights, optimizer, trainer = read_checkpoint(tmp_path / "checkpoint_00000008")
    assert torch.equal(weights["generator"]["w"], torch.arange(6.0).reshape(2, 3)) and trainer == {"step": 8}
    assert optimizer["param_groups"][0]["betas"] == (0.9, 0.99)


def test_a_cut_file_or_a_cut_state_makes_the_checkpoint_incomplete(tmp_path) -> None:
    fs = fsspec.filesystem("file")
    for i, cut in enumerate(("generator.safetensors", STATE_FILE, "optimizer.safetensors")):
        directory = tmp_path / f"checkpoint_{i:08d}"
        _write(directory)
        data = (directory / cut).read_bytes()
        (directory / cut).write_bytes(data[: len(data) // 2])
        assert complete_state(fs, str(directory)) is None, cut
    _write(tmp_path / "missing")
    (tmp_path / "missing" / "generator.safetensors").unlink()  # missing, its state intact
    assert complete_state(fs, str(tmp_path / "missing")) is None
