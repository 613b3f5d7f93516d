"""Training checkpoints: safetensors only, the official layout plus the trainer's own state.

A checkpoint directory holds:

- ``generator.safetensors`` / ``lora.safetensors`` / ``controlnet.safetensors`` (and ``generator_ema``): flat
  state dicts with the official key names, loadable by the official code, by ``stages`` and (generator) by
  diffusers' ``StableCascadeUNet`` through ``stages.diffusers_keys``;
- ``optimizer.safetensors``: the optimizer's tensors keyed ``{param name}/{state}`` (names, not indices, so
  DDP/FSDP wrappers do not matter); its param groups and scalars go in ``trainer_state.json``;
- ``trainer_state.json``: step, adaptive-loss buckets, the data position (the next step), the run's config,
  and the byte size of every other file of the checkpoint.

A checkpoint is complete when its ``trainer_state.json`` parses and every file it lists has its size: a run
killed while Ray Train persisted a checkpoint leaves an incomplete one, which ``complete_state`` refuses.
Nothing is pickled. Writing goes to a local directory that Ray Train then persists (local or s3).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from stages.weights import read_safetensors, save_weights

OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"


def optimizer_to_tensors(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split a name-keyed optimizer state dict (``get_state_dict``) into tensors and JSON."""
    tensors, scalars = {}, {}
    for name, values in state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{name}/{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{name}/{key}"] = value
    groups = [
        {k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in state["param_groups"]
    ]
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], structure: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`optimizer_to_tensors`."""
    state: dict[str, dict[str, Any]] = {}
    for flat, value in [*tensors.items(), *structure["scalars"].items()]:
        name, _, key = flat.rpartition("/")
        state.setdefault(name, {})[key] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in structure["param_groups"]]
    return {"state": state, "param_groups": groups}


def write_checkpoint(
    directory: str | Path,
    weights: dict[str, dict[str, torch.Tensor]],
    optimizer_state: dict[str, Any],
    trainer_state: dict[str, Any],
) -> None:
    """Write ``{name}.safetensors`` per entry of ``weights``, the optimizer and ``trainer_state.json``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, state in weights.items():
        save_weights({k: v.detach().cpu() for k, v in state.items()}, directory / f"{name}.safetensors")
    tensors, structure = optimizer_to_tensors(optimizer_state)
    save_weights(tensors, directory / OPTIMIZER_FILE)
    sizes = {p.name: p.stat().st_size for p in sorted(directory.glob("*.safetensors"))}
    state = trainer_state | {"optimizer": structure, "files": sizes}
    (directory / STATE_FILE).write_text(json.dumps(state, indent=1))


def complete_state(fs: Any, directory: str) -> dict[str, Any] | None:
    """The trainer state of the checkpoint at ``directory`` on ``fs`` (fsspec), or None when it is incomplete:
    its state does not parse, or a file it lists is missing or has another size."""
    try:
        state = json.loads(fs.cat_file(f"{directory}/{STATE_FILE}"))
        sizes = {name: fs.size(f"{directory}/{name}") for name in state["files"]}
    except (OSError, ValueError, KeyError):
        return None
    return state if sizes == state["files"] else None


def read_checkpoint(directory: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any], dict]:
    """(weights by name, optimizer state dict, trainer state) of a checkpoint directory."""
    directory = Path(directory)
    trainer_state = json.loads((directory / STATE_FILE).read_text())
    trainer_state.pop("files", None)
    optimizer = optimizer_from_tensors(
        read_safetensors(directory / OPTIMIZER_FILE).state_dict, trainer_state.pop("optimizer")
    )
    weights = {
        p.name.removesuffix(".safetensors"): read_safetensors(p).state_dict
        for p in sorted(directory.glob("*.safetensors"))
        if p.name != OPTIMIZER_FILE
    }
    return weights, optimizer, trainer_state
