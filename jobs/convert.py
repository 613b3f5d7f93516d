"""``cascade convert``: a Stage B/C checkpoint to a diffusers ``StableCascadeUNet`` folder, and back.

To diffusers, the result is ``DST/config.json`` (the UNet's constructor arguments, written from the flavor's
config, nothing fetched) and ``DST/diffusion_pytorch_model.safetensors``, which
``StableCascadeUNet.from_pretrained(DST)`` loads offline in one call. Back to official, the result is one
flat safetensors file with the official keys. Only keys change (``stages.diffusers_keys``); every tensor
keeps its dtype and bits, so a round trip gives the original state dict exactly. Local paths only.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from functools import cache
from importlib import metadata
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from stages.diffusers_keys import (
    diffusers_config,
    diffusers_stage,
    diffusers_to_official,
    official_to_diffusers,
)
from stages.flavors import FLAVORS, Flavor, get_flavor
from stages.weights import check_state_dict

DIRECTIONS = ("diffusers", "official")
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = WEIGHTS_NAME + ".index.json"
CLASS_NAME = "StableCascadeUNet"
FAMILIES = ("stage_b", "stage_c")
# A key only each family has (spec §6/§8).
_MARKERS = {"stage_c": "clip_txt_mapper.weight", "stage_b": "effnet_mapper.0.weight"}
# Names a Stage B/C file has inside a folder: ours (a training checkpoint) and the released ones.
_CHECKPOINT_NAMES = (
    "generator.safetensors",
    "generator_ema.safetensors",
    *(name for flavor in FLAVORS.values() if flavor.family in FAMILIES for name in flavor.files),
)


@dataclass(frozen=True)
class Converted:
    """What ``convert_checkpoint`` wrote: the folder (to diffusers) or the file (to official)."""

    path: Path
    direction: str
    flavor: str | None
    num_tensors: int
    dtypes: tuple[str, ...]


def convert_checkpoint(
    src: str | os.PathLike, dst: str | os.PathLike, *, flavor: str | None = None, direction: str | None = None
) -> Converted:
    """Convert a Stage B/C checkpoint between the official flat layout and a diffusers folder.

    Args:
        src: an official flat safetensors file (or a folder holding exactly one, e.g. a training
            ``checkpoint_<step>/``), or a diffusers folder with ``config.json``.
        dst: the diffusers folder to write, or the ``.safetensors`` file to write.
        flavor: e.g. ``stage_c/1b``; None infers it from the tensors' keys and shapes. Going to official
            it is optional and, when given, the result is checked against it.
        direction: ``"diffusers"`` or ``"official"``; None means official when ``src`` is a diffusers
            folder, else diffusers.

    Raises:
        FileNotFoundError: ``src`` or its weights are missing.
        ValueError: a bad option, a file that is not a Stage B/C checkpoint, or no single matching flavor.
    """
    src_path, dst_path = Path(src), Path(dst)
    if not src_path.exists():
        raise FileNotFoundError(f"{src}: no such file or folder")
    if direction is None:
        direction = "official" if (src_path / CONFIG_NAME).is_file() else "diffusers"
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}")
    if flavor is not None and get_flavor(flavor).family not in FAMILIES:
        raise ValueError(f"--flavor {flavor!r} is not a Stage B/C flavor (stage_b/* or stage_c/*)")
    if direction == "diffusers":
        return _to_diffusers(src_path, dst_path, flavor)
    return _to_official(src_path, dst_path, flavor)


def _to_diffusers(src: Path, dst: Path, flavor_name: str | None) -> Converted:
    path = _official_file(src)
    state = _read(path)
    flavor = _check_flavor(state, flavor_name, str(path)) if flavor_name else infer_flavor(state, str(path))
    if dst.is_file():
        raise ValueError(f"{dst} is a file; the diffusers output is a folder (config.json + {WEIGHTS_NAME})")
    dst.mkdir(parents=True, exist_ok=True)
    renamed = official_to_diffusers(state)
    _write_atomic(dst / WEIGHTS_NAME, lambda tmp: save_file(renamed, tmp, metadata={"format": "pt"}))
    config = {"_class_name": CLASS_NAME, "_diffusers_version": _diffusers_version()}
    text = json.dumps(config | diffusers_config(flavor.config), indent=2) + "\n"
    _write_atomic(dst / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))
    return Converted(dst, "diffusers", flavor.name, len(renamed), _dtypes(renamed))


def _to_official(src: Path, dst: Path, flavor_name: str | None) -> Converted:
    config_path = src / CONFIG_NAME
    if not config_path.is_file():
        raise ValueError(f"{src} is not a diffusers folder (no {CONFIG_NAME}); --to official needs one")
    config = json.loads(config_path.read_text())
    if config.get("_class_name") != CLASS_NAME:
        raise ValueError(f"{config_path}: _class_name is {config.get('_class_name')!r}, not {CLASS_NAME}")
    if dst.suffix != ".safetensors" or dst.is_dir():
        raise ValueError(f"{dst}: the official output is one file; name it like stage_c.safetensors")
    state = diffusers_to_official(_read_diffusers_weights(src), stage=diffusers_stage(config))
    if flavor_name:
        flavor = _check_flavor(state, flavor_name, str(src)).name
    else:
        matches = match_flavors(state)
        flavor = matches[0] if len(matches) == 1 else None
    dst.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(dst, lambda tmp: save_file(state, tmp))  # no metadata, as the official files
    return Converted(dst, "official", flavor, len(state), _dtypes(state))


def infer_flavor(state: dict[str, torch.Tensor], source: str) -> Flavor:
    """The one Stage B/C flavor whose keys and shapes equal ``state``'s; ValueError naming ``--flavor``."""
    families = [family for family, key in _MARKERS.items() if key in state]
    if not families:
        hint = " (it looks like a diffusers state dict: convert its folder with --to official)"
        diffusers_like = any(".attention.to_q." in key for key in state)
        raise ValueError(
            f"{source} is not a Stage B/C checkpoint: it has neither {' nor '.join(_MARKERS.values())}"
            + (hint if diffusers_like else "")
        )
    matches = match_flavors(state)
    if len(matches) == 1:
        return get_flavor(matches[0])
    if matches:
        raise ValueError(f"{source} fits several flavors ({', '.join(matches)}); choose one with --flavor")
    known = ", ".join(name for name in FLAVORS if name.startswith(families[0]))
    raise ValueError(
        f"{source}: its keys and shapes match no {families[0]} flavor ({known}); "
        "pass --flavor NAME to see which keys differ"
    )


def match_flavors(state: dict[str, torch.Tensor]) -> list[str]:
    """Every Stage B/C flavor whose state dict has exactly ``state``'s keys and shapes."""
    shapes = {key: tuple(value.shape) for key, value in state.items()}
    return [name for name in FLAVORS if FLAVORS[name].family in FAMILIES and _shapes(name) == shapes]


@cache
def _shapes(name: str) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in get_flavor(name).build(device="meta").state_dict().items()}


def _check_flavor(state: dict[str, torch.Tensor], name: str, source: str) -> Flavor:
    flavor = get_flavor(name)
    check_state_dict(flavor.build(device="meta"), state, source)  # WeightsError (a ValueError)
    return flavor


def _official_file(src: Path) -> Path:
    """``src`` itself, or the single Stage B/C checkpoint file in the folder ``src``."""
    if src.is_file():
        return src
    found = [src / name for name in _CHECKPOINT_NAMES if (src / name).is_file()]
    if len(found) == 1:
        return found[0]
    if not found:
        raise FileNotFoundError(
            f"{src}: no Stage B/C checkpoint in it (looked for {', '.join(_CHECKPOINT_NAMES)})"
        )
    names = ", ".join(p.name for p in found)
    raise ValueError(f"{src} holds several checkpoints ({names}); give the file, e.g. {found[0]}")


def _read(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{path}: not a valid safetensors file ({exc}); pickles are never loaded") from exc


def _read_diffusers_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The diffusers weights of ``folder``: one file, or the shards its index names."""
    if (folder / WEIGHTS_NAME).is_file():
        return _read(folder / WEIGHTS_NAME)
    if not (folder / INDEX_NAME).is_file():
        raise FileNotFoundError(f"{folder}: neither {WEIGHTS_NAME} nor {INDEX_NAME}")
    weight_map = json.loads((folder / INDEX_NAME).read_text())["weight_map"]
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        state |= _read(folder / shard)
    if state.keys() != weight_map.keys():
        raise ValueError(f"{folder}: the shards' keys differ from those {INDEX_NAME} lists")
    return state


def _write_atomic(path: Path, write) -> None:
    """Write through ``write(tmp_path)`` then rename, so ``path`` never holds a partial file."""
    tmp = path.with_name(path.name + ".partial")
    write(str(tmp))
    os.replace(tmp, path)


def _dtypes(state: dict[str, torch.Tensor]) -> tuple[str, ...]:
    return tuple(sorted({str(v.dtype).removeprefix("torch.") for v in state.values()}))


def _diffusers_version() -> str:
    try:
        return metadata.version("diffusers")
    except metadata.PackageNotFoundError:
        return "0.42.1"  # the version the layout was checked against (spec §8)


def cmd_convert(args: argparse.Namespace) -> int:
    """``cascade convert``: prints what it wrote."""
    done = convert_checkpoint(args.src, args.dst, flavor=args.flavor, direction=args.direction)
    print(
        f"{done.flavor or 'Stage B/C'} → {done.direction}: {done.num_tensors} tensors "
        f"({', '.join(done.dtypes)}) written to {done.path}"
    )
    return 0


def add_convert_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``cascade convert SRC DST [--flavor F] [--to diffusers|official]``."""
    p = sub.add_parser(
        "convert",
        help="convert a Stage B/C checkpoint to a diffusers StableCascadeUNet folder, or back",
        description="Official flat safetensors (released or a training checkpoint) → DST/config.json + "
        f"DST/{WEIGHTS_NAME}, loadable offline with StableCascadeUNet.from_pretrained(DST); or a "
        "diffusers folder → one official flat safetensors file. Tensors keep their dtype and bits.",
    )
    p.add_argument(
        "src", help="a .safetensors file, a folder holding one (checkpoint_<step>/), or a diffusers folder"
    )
    p.add_argument("dst", help="the diffusers folder to write, or (--to official) the .safetensors file")
    p.add_argument(
        "--flavor",
        default=None,
        help="e.g. stage_c/1b or stage_b/700m (default: inferred from the tensors' keys and shapes)",
    )
    p.add_argument(
        "--to",
        dest="direction",
        choices=DIRECTIONS,
        default=None,
        help="output layout (default: official if SRC has config.json, else diffusers)",
    )
    p.set_defaults(func=cmd_convert)
