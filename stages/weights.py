"""Safetensors weights: strict loading from a local path or any fsspec URL, saving, and sha256.

Only safetensors are ever read; a pickle (``.pt``/``.pth``/``.ckpt``) is refused before it is opened
by torch. Nothing here downloads from a model hub: a URL is read only when the user passes one.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import fsspec
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import nn

_PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK\x03\x04")
_MAX_LISTED = 8


class WeightsError(ValueError):
    """A weights file that cannot be loaded into the requested model; the message names the file."""


@dataclass(frozen=True)
class LoadedWeights:
    """A state dict read from one file, with the file's sha256 (the cache key of everything it encodes)."""

    path: str
    sha256: str
    state_dict: dict[str, torch.Tensor]


StorageOptions = dict | None  # fsspec storage options, e.g. {"endpoint_url": ..., "key": ..., "secret": ...}


def _read_bytes(path: str | os.PathLike, storage_options: StorageOptions = None) -> bytes:
    with fsspec.open(os.fspath(path), "rb", **(storage_options or {})) as f:
        return f.read()


def read_safetensors(path: str | os.PathLike, storage_options: StorageOptions = None) -> LoadedWeights:
    """Read a safetensors file (local path or fsspec URL with ``storage_options``) and hash its bytes.

    Raises:
        WeightsError: the file is a pickle or is not valid safetensors.
    """
    data = _read_bytes(path, storage_options)
    name = os.fspath(path)
    if data[:2] in _PICKLE_MAGIC[:4] or data[:4] == _PICKLE_MAGIC[4]:
        raise WeightsError(
            f"{name}: this is a pickle/zip torch checkpoint, not safetensors; pickles are never loaded "
            "(they can run code). Convert it once with safetensors.torch.save_file on a trusted machine."
        )
    try:
        state = load_safetensors_bytes(data)
    except (SafetensorError, ValueError, OSError) as exc:
        raise WeightsError(f"{name}: not a valid safetensors file ({exc})") from exc
    return LoadedWeights(path=name, sha256=hashlib.sha256(data).hexdigest(), state_dict=state)


def sha256_of(path: str | os.PathLike, storage_options: StorageOptions = None) -> str:
    """sha256 of a file's bytes (local path or fsspec URL)."""
    digest = hashlib.sha256()
    with fsspec.open(os.fspath(path), "rb", **(storage_options or {})) as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _listed(keys: list[str]) -> str:
    more = f" … (+{len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else ""
    return ", ".join(keys[:_MAX_LISTED]) + more


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Refuse a state dict whose keys or shapes differ from the model's, listing the first offenders."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k} (file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)})"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {_listed(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_listed(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} wrong shapes: {_listed(wrong)}")
    if problems:
        raise WeightsError(f"{source} does not fit {type(model).__name__}: " + "; ".join(problems))


def load_weights(
    model: nn.Module, path: str | os.PathLike, *, assign: bool = False, storage_options: StorageOptions = None
) -> str:
    """Strictly load a safetensors file (bf16 or fp32) into ``model``; returns the file's sha256.

    Tensors are cast to the model's dtype. With ``assign=True`` a meta-device model takes the file's
    tensors directly (no double allocation for multi-GB checkpoints).
    """
    loaded = read_safetensors(path, storage_options)
    check_state_dict(model, loaded.state_dict, loaded.path)
    expected = model.state_dict()
    state = {
        k: v.to(expected[k].dtype) if expected[k].is_floating_point() and not assign else v
        for k, v in loaded.state_dict.items()
    }
    model.load_state_dict(state, strict=True, assign=assign)
    return loaded.sha256


def save_weights(
    state: dict[str, torch.Tensor],
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    storage_options: StorageOptions = None,
) -> str:
    """Write a flat state dict as safetensors (local or fsspec URL), optionally cast; returns its sha256.

    The bytes go out in one write, so an S3 object appears complete or not at all.
    """
    tensors = {
        k: (v.detach().to(dtype) if dtype is not None and v.is_floating_point() else v.detach())
        .contiguous()
        .cpu()
        for k, v in state.items()
    }
    data = save_safetensors_bytes(tensors)
    with fsspec.open(os.fspath(path), "wb", **(storage_options or {})) as f:
        f.write(data)
    return hashlib.sha256(data).hexdigest()


def state_dict_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 of a state dict as safetensors bytes: the fingerprint of random-init (tiny) weights."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    return hashlib.sha256(save_safetensors_bytes(tensors)).hexdigest()
