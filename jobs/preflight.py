"""The path checks every job makes before Ray starts, each naming its dotted config field.

Inputs must match something, weights files must exist, an output must be a writable directory (it is made
here, and a probe file written and removed) and must not lie inside an input. Fields are found by name over
the whole config tree: ``output_dir`` is an output; ``path``, ``input_path``, ``latents``, ``scores_dir`` and
``kept_keys``, ``empty_caption`` are inputs; a field ending in ``weights`` is a weights file or folder.

A URL (``s3://...``) is checked with the endpoint its section names (``endpoint_url``, ``inputs_endpoint_url``
for inputs; ``output_endpoint_url``, ``storage_endpoint_url`` for outputs): an input must match an object or
prefix, an output must not be an object. One call each; writability on an object store shows at the first write.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import tempfile
from pathlib import Path
from typing import Any

from jobs.config import ConfigError, walk

INPUT_FIELDS = ("path", "input_path", "latents", "scores_dir", "kept_keys", "empty_caption")
OUTPUT_FIELDS = ("output_dir",)
INPUT_ENDPOINTS = ("inputs_endpoint_url", "endpoint_url")
OUTPUT_ENDPOINTS = ("output_endpoint_url", "storage_endpoint_url", "endpoint_url")


def _options(parent: Any, endpoints: tuple[str, ...]) -> dict[str, Any]:
    """fsspec options from the first endpoint field the section has."""
    for name in endpoints:
        if hasattr(parent, name):
            value = getattr(parent, name)
            return {"endpoint_url": value} if value else {}
    return {}


def _check_remote(name: str, value: str, parent: Any, is_input: bool) -> None:
    import fsspec

    fs, path = fsspec.core.url_to_fs(
        value, **_options(parent, INPUT_ENDPOINTS if is_input else OUTPUT_ENDPOINTS)
    )
    if is_input and not (fs.glob(path) if glob.has_magic(path) else fs.exists(path)):
        raise ConfigError(f"{name}={value!r} matches no object or prefix")
    if not is_input and fs.isfile(path):
        raise ConfigError(f"{name}={value!r} is an object; an output must be a prefix (a folder)")


def _local(value: Any) -> str | None:
    """The local path of a field value, or None for an unset field or a URL."""
    if not isinstance(value, str) or not value:
        return None
    if value.startswith("file://"):
        return value[len("file://") :]
    return None if "://" in value else value


def _matches(path: str) -> bool:
    return bool(glob.glob(path)) if glob.has_magic(path) else os.path.exists(path)


def _root(path: str) -> Path:
    """The folder an input pattern reads from (a glob's fixed prefix), absolute."""
    parts = Path(path).parts
    fixed = [p for p in parts[: next((i for i, p in enumerate(parts) if glob.has_magic(p)), len(parts))]]
    return Path(*fixed).resolve() if fixed else Path.cwd()


def _check_output(name: str, path: str) -> None:
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise ConfigError(f"{name}={path!r} is a file; an output must be a directory")
    existing = next(p for p in (target, *target.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"{name}={path!r}: {existing} is a file, so the directory cannot be made")
    try:  # the job makes it anyway; a probe file is the only test that holds for root and read-only mounts
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=target):
            pass
    except OSError as err:
        raise ConfigError(f"{name}={path!r} is not writable ({err.strerror or err})") from None


def preflight(config: Any) -> None:
    """Raise ``ConfigError`` for the first input that matches nothing, missing weights or unusable output."""
    inputs: list[tuple[str, Path]] = []
    outputs: list[tuple[str, str]] = []
    for name, value, parent, _ in walk(config):
        leaf, path = name.rsplit(".", 1)[-1], _local(value)
        if path is None:
            if isinstance(value, str) and "://" in value and leaf in (*INPUT_FIELDS, *OUTPUT_FIELDS):
                _check_remote(name, value, parent, is_input=leaf in INPUT_FIELDS)
            continue
        if leaf in INPUT_FIELDS:
            if not _matches(path):
                raise ConfigError(f"{name}={value!r} matches no file or folder")
            inputs.append((name, _root(path)))
        elif leaf.endswith("weights"):
            if not os.path.exists(path):
                raise ConfigError(f"{name}={value!r} does not exist")
        elif leaf in OUTPUT_FIELDS:
            outputs.append((name, path))
    for out_name, path in outputs:
        out = Path(path).resolve()
        for in_name, root in inputs:
            if root.is_dir() and out.is_relative_to(root):
                raise ConfigError(
                    f"{out_name}={path!r} is inside the input {in_name}={str(root)!r}: the job would read "
                    "its own output; choose an output outside it"
                )
        _check_output(out_name, path)


def _is_path_field(name: str) -> bool:
    return name in (*INPUT_FIELDS, *OUTPUT_FIELDS) or name.endswith("weights")


def absolute_paths(config: Any) -> Any:
    """The config with every local input, output and weights path made absolute against this process's working
    directory: Ray workers run elsewhere (Ray Train's in its trial folder), so a relative path would land there."""
    changes = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            changes[f.name] = absolute_paths(value)
        elif (
            _is_path_field(f.name)
            and isinstance(value, str)
            and _local(value) == value
            and not os.path.isabs(value)
        ):
            changes[f.name] = os.path.abspath(value)
    return dataclasses.replace(config, **changes) if changes else config
