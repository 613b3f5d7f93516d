"""Job configuration: YAML files plus ``--set a.b=c`` overrides, turned into frozen dataclasses.

YAML is read with ``yaml.safe_load`` only (no object tags). An unknown key, a missing required field or a
value the config's ``__post_init__`` refuses raises ``ConfigError`` naming the dotted field, before any
cluster work starts.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the field."""


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = data
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{part}' is not a section")
        node = child
    node[leaf] = value


def parse_overrides(overrides: Sequence[str]) -> list[tuple[str, Any]]:
    """``["a.b=3", "c=[1, 2]"]`` → ``[("a.b", 3), ("c", [1, 2])]``; values are parsed as YAML scalars/lists."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set resources.batch_size=64")
        parsed.append((key.strip(), yaml.safe_load(raw) if raw.strip() else ""))
    return parsed


def _nested_dataclass(tp: Any) -> type | None:
    """The dataclass inside ``tp`` (``X`` or ``X | None``), if any."""
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        return inner[0] if len(inner) == 1 else None
    return None


def _coerce(tp: Any, value: Any, name: str = "") -> Any:
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        return from_dict(tp, value, f"{name}.")
    if isinstance(value, list) and typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if args and args[-1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{name}[{i}]") for i, v in enumerate(value))
        return tuple(value)
    if isinstance(value, list) and typing.get_origin(tp) in (typing.Union, types.UnionType):
        tuple_types = [a for a in typing.get_args(tp) if typing.get_origin(a) is tuple]
        return _coerce(tuple_types[0], value) if tuple_types else value
    return value


def from_dict(cls: type[T], data: dict[str, Any] | None, prefix: str = "") -> T:
    """Build the frozen dataclass ``cls`` from plain data, naming the dotted field on any error."""
    data = dict(data or {})
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        names = ", ".join(f"{prefix}{k}" for k in unknown)
        raise ConfigError(
            f"unknown config field(s) {names}; allowed: {', '.join(prefix + f for f in fields)}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        nested = _nested_dataclass(hints[name])
        if nested is not None and isinstance(value, dict):
            kwargs[name] = from_dict(nested, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(hints[name], value, f"{prefix}{name}")
    missing = [
        name
        for name, f in fields.items()
        if name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"missing required config field(s): {', '.join(prefix + m for m in missing)}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        section = prefix.rstrip(".") or cls.__name__
        raise ConfigError(f"{section}: {exc}") from exc


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Read a YAML file (optional), apply ``--set`` overrides, and build ``cls``."""
    data: dict[str, Any] = {}
    if path is not None:
        text = Path(path).read_text()
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(
                f"{path}: the top level must be a mapping of fields, got {type(loaded).__name__}"
            )
        data = loaded or {}
    for key, value in parse_overrides(overrides):
        _set_dotted(data, key, value)
    return from_dict(cls, data)


def _default(f: dataclasses.Field, parent: Any) -> Any:
    if parent is not None:
        return getattr(parent, f.name)
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def describe(cls: type, prefix: str = "", defaults: Any = None) -> list[str]:
    """One line per field, ``name (type) = default``, for ``--help`` (nested sections flattened)."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        value = _default(f, defaults)
        nested = _nested_dataclass(hints[f.name])
        if nested is not None:
            lines.extend(
                describe(nested, f"{prefix}{f.name}.", value if dataclasses.is_dataclass(value) else None)
            )
            continue
        default = "(required)" if value is dataclasses.MISSING else repr(value)
        type_name = getattr(hints[f.name], "__name__", str(hints[f.name])).replace("typing.", "")
        lines.append(f"{prefix}{f.name} ({type_name}) = {default}")
    return lines


def walk(config: Any, prefix: str = "") -> typing.Iterator[tuple[str, Any, Any, dataclasses.Field]]:
    """Every field of a config tree, depth first: ``(dotted name, value, the dataclass holding it, field)``."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        yield f"{prefix}{f.name}", value, config, f
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            yield from walk(value, f"{prefix}{f.name}.")


TRAINED = {"trained": True}  # field metadata: the flavor a job trains (no weights = train from scratch)
_WEIGHT_FIELDS = ("weights", "clip_weights", "aesthetic_weights")


def model_fields(config: Any) -> typing.Iterator[tuple[str, str, bool, bool]]:
    """The models a config names: ``(dotted field, flavor, has weights, trained)``. A model field holds a flavor
    name (``flavor``, ``preview.previewer``, ...); its weights are the sibling ``weights`` fields or
    ``<field>_weights``."""
    from stages.flavors import FLAVORS

    for name, value, parent, f in walk(config):
        leaf = name.rsplit(".", 1)[-1]
        if not isinstance(value, str) or not (
            value in FLAVORS or (leaf == "flavor" and value.endswith("/tiny"))
        ):
            continue  # (the scorer's flavors, ``clip_score/*``, have a registry of their own)
        siblings = _WEIGHT_FIELDS if leaf == "flavor" else (f"{leaf}_weights",)
        has_weights = any(getattr(parent, w, None) for w in siblings)
        yield name, value, has_weights, bool(f.metadata.get("trained"))


def random_weight_models(config: Any) -> list[str]:
    """The models a config runs on seeded random weights, as ``field=flavor``: a ``*/tiny`` flavor without a
    weights file, or a frozen released flavor without one (a trained one without weights trains from scratch)."""
    return [
        f"{name}={flavor}"
        for name, flavor, has_weights, trained in model_fields(config)
        if not has_weights and (flavor.endswith("/tiny") or not trained)
    ]
