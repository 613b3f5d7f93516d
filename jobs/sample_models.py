"""The models ``cascade sample`` (and the web app) sample with: flavors, where their weights come from, and
whether any is random.

A :class:`ModelSource` names them; :func:`load_models` builds them once (cached) into a :class:`SampleModels`.

- **Flavors**: ``released`` (the official notebooks' ``stage_c_3b``/``stage_b_3b`` configs: Stage C 3.6B,
  Stage B 1.5B, Stage A, effnet, CLIP-bigG text, CLIP-L vision) or ``tiny`` (every model a ``*/tiny`` flavor:
  seeded random weights, for tests). ``stage_c``/``stage_b`` pick another flavor of one model
  (``stage_c/1b``, ``stage_b/700m``). Tiny and released flavors do not fit together and never mix.
- **Weights**: a released flavor loads its official file from the ``weights`` folder (``stages.flavors``'
  names, e.g. ``stage_c_bf16.safetensors``, ``text_encoder/``); a tiny flavor is random. Random weights are
  never a default: without ``weights`` the tiny flavors must be named.
- **Training checkpoints** (``checkpoint_<step>/`` of ``cascade train-*``, at most one per training mode)
  replace or adapt the model they trained, on the flavor their ``trainer_state.json`` records: a full
  fine-tune's ``generator_ema`` (else ``generator``) replaces Stage C (``train-c``) or Stage B (``train-b``);
  a LoRA (``train-lora``) is merged into Stage C; a ControlNet (``train-controlnet``) steers it in
  ``controlnet`` mode. The Stage C a LoRA or ControlNet adapts is the fine-tuned one when a ``train-c``
  checkpoint is given too, else the released one from ``weights`` (or the seeded tiny one). A run does not
  record its base weights: give the ones it trained on. Weights load strictly: a file that does not fit
  names itself.

The CLIP vision tower and the ControlNets load on first use (only image variation and ControlNet sampling need
them).
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import time
from dataclasses import dataclass
from typing import Any

import fsspec
import torch
from torch import nn

from jobs.train_checkpoint import complete_state
from stages.conditioners import ClipVisionConditioner
from stages.controlnet import ControlNet
from stages.flavors import build_model, find_weights, get_flavor
from stages.lora import build_lora, load_lora, merge_lora
from stages.sampling import CascadeModels
from stages.weights import WeightsError, read_safetensors

_RELEASED = {"stage_c": "stage_c/3.6b", "stage_b": "stage_b/1.5b", "stage_a": "stage_a", "effnet": "effnet",
             "clip_text": "clip_text/bigg", "clip_vision": "clip_vision/l14"}  # fmt: skip
PRESETS: dict[str, dict[str, str]] = {
    "released": _RELEASED,  # the notebooks' stage_c_3b.yaml + stage_b_3b.yaml
    "tiny": {role: f"{role}/tiny" for role in _RELEASED},
}
EAGER_ROLES = ("stage_c", "stage_b", "stage_a", "effnet", "clip_text")  # clip_vision loads on first use
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# trainer_state.json "mode" → the model the checkpoint's weights replace or adapt
CHECKPOINT_ROLES = {"stage_c": "stage_c", "lora": "stage_c", "controlnet": "stage_c", "stage_b": "stage_b"}
RANDOM = "random"


@dataclass(frozen=True, kw_only=True)
class ModelSource:
    """Where the sampling models come from (hashable: :func:`load_models` caches by it).

    Attributes:
        weights: a folder holding the released files under their official names (local path or fsspec URL).
        checkpoints: ``checkpoint_<step>/`` folders of ``cascade train-c``, ``train-lora``,
            ``train-controlnet`` and ``train-b`` runs, at most one of each.
        flavors: ``released`` (default) or ``tiny`` (every model random, for tests: named, never a default).
        stage_c, stage_b: another flavor of that model (e.g. ``stage_c/1b``, ``stage_b/700m``).
        device: ``cuda``, ``cpu``, ...; None: CUDA when available.
        dtype: ``float32`` or ``bfloat16`` (weights cast, sampling under autocast).
    """

    weights: str | None = None
    checkpoints: tuple[str, ...] = ()
    flavors: str = "released"
    stage_c: str | None = None
    stage_b: str | None = None
    device: str | None = None
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.flavors not in PRESETS:
            raise ValueError(f"flavors={self.flavors!r}; allowed: {', '.join(PRESETS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}; allowed: {', '.join(DTYPES)}")
        for role in ("stage_c", "stage_b"):
            name = getattr(self, role)
            if name is not None and get_flavor(name).family != role:
                raise ValueError(f"{role}={name!r} is not a {role} flavor")


@dataclass(frozen=True)
class CheckpointInfo:
    """A training checkpoint: its folder, what it trained (``mode``) on which flavor, and its step."""

    path: str
    mode: str
    flavor: str
    step: int

    @property
    def role(self) -> str:
        """The model it replaces or adapts: ``stage_c`` or ``stage_b``."""
        return CHECKPOINT_ROLES[self.mode]

    def file(self, name: str) -> str:
        return f"{self.path.rstrip('/')}/{name}.safetensors"


def read_checkpoint_info(path: str) -> CheckpointInfo:
    """Check that ``path`` is a complete training checkpoint; read what it trained (``trainer_state.json``)."""
    fs, root = fsspec.core.url_to_fs(path)
    if not fs.isdir(root):
        raise FileNotFoundError(f"--checkpoint {path}: no such folder")
    state = complete_state(fs, root)
    if state is None:
        raise ValueError(
            f"--checkpoint {path}: not a complete training checkpoint (trainer_state.json missing or "
            "unreadable, or a file it lists missing or cut short)"
        )
    mode, flavor = state.get("mode"), state.get("flavor")
    if mode not in CHECKPOINT_ROLES or not isinstance(flavor, str):
        raise ValueError(f"--checkpoint {path}: trainer_state.json records mode={mode!r}, flavor={flavor!r}")
    if get_flavor(flavor).family != CHECKPOINT_ROLES[mode]:
        raise ValueError(f"--checkpoint {path}: mode {mode!r} does not train flavor {flavor!r}")
    return CheckpointInfo(path, mode, flavor, int(state.get("step", 0)))


def read_checkpoints(paths: tuple[str, ...]) -> dict[str, CheckpointInfo]:
    """Training mode → checkpoint, at most one of each (a LoRA and a ControlNet may adapt one Stage C)."""
    found: dict[str, CheckpointInfo] = {}
    for path in paths:
        info = read_checkpoint_info(path)
        if info.mode in found:
            raise ValueError(
                f"--checkpoint {found[info.mode].path} and --checkpoint {path} are both {info.mode} "
                "checkpoints: give one"
            )
        found[info.mode] = info
    return found


def resolve_flavors(source: ModelSource, checkpoints: dict[str, CheckpointInfo]) -> dict[str, str]:
    """Role → flavor: the preset, the explicit ``stage_c``/``stage_b``, and the flavors checkpoints trained.

    Raises:
        ValueError: an explicit flavor, or another checkpoint's, differs from a checkpoint's flavor, or tiny
            and released flavors mix.
    """
    flavors = dict(PRESETS[source.flavors])
    pinned: dict[str, str] = {}  # role → what fixed its flavor: an explicit option, then a checkpoint
    for role in ("stage_c", "stage_b"):
        if (explicit := getattr(source, role)) is not None:
            flavors[role], pinned[role] = explicit, f"--{role.replace('_', '-')} {explicit}"
    for ckpt in checkpoints.values():
        if ckpt.role in pinned and flavors[ckpt.role] != ckpt.flavor:
            raise ValueError(
                f"--checkpoint {ckpt.path} was trained on {ckpt.flavor}, not {pinned[ckpt.role]}"
            )
        flavors[ckpt.role], pinned[ckpt.role] = ckpt.flavor, f"{ckpt.flavor} (--checkpoint {ckpt.path})"
    tiny = sorted(f"{role}={name}" for role, name in flavors.items() if get_flavor(name).tiny)
    if tiny and len(tiny) != len(flavors):
        released = sorted(f"{role}={name}" for role, name in flavors.items() if not get_flavor(name).tiny)
        where = "".join(f"--checkpoint {c.path} holds {c.flavor}; " for c in checkpoints.values())
        raise ValueError(
            f"{where}tiny flavors ({', '.join(tiny)}) do not fit released ones ({', '.join(released)}): use "
            "--flavors tiny (every model random, for tests) or released flavors with --weights DIR"
        )
    return flavors


class SampleModels:
    """The loaded models of one :class:`ModelSource`: the ``CascadeModels`` bundle for ``stages.sampling``,
    what each model is (flavor, weights file, sha256 or ``"random"``), and the lazily loaded CLIP vision tower
    and ControlNets. Thread-safe for the lazy loads (a web app serves several requests)."""

    def __init__(self, source: ModelSource) -> None:
        start = time.perf_counter()
        self.source = source
        self.device = torch.device(source.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = DTYPES[source.dtype]
        self.checkpoints = read_checkpoints(source.checkpoints)
        self.flavors = resolve_flavors(source, self.checkpoints)
        self.tiny = get_flavor(self.flavors["stage_c"]).tiny
        if source.weights is not None:
            if self.tiny:
                raise ValueError(
                    f"--weights {source.weights} with tiny flavors: tiny flavors are random-init only"
                )
            fs, root = fsspec.core.url_to_fs(source.weights)
            if not fs.isdir(root):
                raise FileNotFoundError(f"--weights {source.weights}: no such folder")
        self.records: dict[str, dict[str, Any]] = {}
        files = self._weights_files({r: self.flavors[r] for r in EAGER_ROLES if self._from_weights(r)})
        built = {role: self._build(role, self.flavors[role], files.get(role)) for role in EAGER_ROLES}
        self._merge_lora(built["stage_c"])
        placed = {role: self._place(model) for role, model in built.items()}
        self.cascade = CascadeModels(text=placed.pop("clip_text"), **placed)
        self._controlnets: dict[str, ControlNet] = {}
        self._lock = threading.Lock()
        self.load_s = time.perf_counter() - start

    # --- where weights come from ----------------------------------------------------------------------------
    def _replaced(self, role: str) -> bool:
        """Whether a checkpoint is a full fine-tune of ``role`` (its weights replace the model's)."""
        return role in self.checkpoints

    def _from_weights(self, role: str) -> bool:
        """Whether ``role`` loads a released file from the weights folder (not random, not the checkpoint)."""
        return not self._replaced(role) and not get_flavor(self.flavors[role]).tiny

    def _weights_files(self, flavors: dict[str, str]) -> dict[str, str]:
        """Role → official file of its flavor in the weights folder; raises listing every missing file."""
        if flavors and self.source.weights is None:
            raise ValueError(
                f"--weights DIR is required: the released flavors ({', '.join(flavors.values())}) load their "
                "official files from it (random-weight test models: --flavors tiny)"
            )
        found, missing = {}, []
        for role, name in flavors.items():
            flavor = get_flavor(name)
            try:
                found[role] = find_weights(flavor, self.source.weights)
            except FileNotFoundError:
                missing.append(f"{' or '.join(flavor.files)} ({name})")
        if missing:
            raise FileNotFoundError(f"--weights {self.source.weights}: missing " + "; ".join(missing))
        return found

    def _build(self, role: str, flavor: str, weights: str | None) -> nn.Module:
        """Build one model on CPU in fp32 and record what it is; a full fine-tune loads the checkpoint's
        ``generator_ema`` (else ``generator``) file."""
        if self._replaced(role):
            ema = self.checkpoints[role].file("generator_ema")
            weights = ema if _exists(ema) else self.checkpoints[role].file("generator")
        model, sha = build_model(flavor, weights=weights)
        self.records[role] = {"flavor": flavor, "weights": weights, "sha256": sha or RANDOM}
        return model

    def _place(self, model: nn.Module) -> nn.Module:
        return model.to(device=self.device, dtype=self.dtype).eval()

    def _merge_lora(self, stage_c: nn.Module) -> None:
        """Merge a LoRA checkpoint into Stage C (rank from the file, the official ``.attn`` filter)."""
        ckpt = self.checkpoints.get("lora")
        if ckpt is None:
            return
        path = ckpt.file("lora")
        state = read_safetensors(path).state_dict
        rank_key = "weights.0.lora_down"
        if rank_key not in state:
            raise WeightsError(f"{path}: no {rank_key}: not a LoRA file")
        bundle = build_lora(stage_c, rank=state[rank_key].shape[0])
        sha = load_lora(bundle, path)
        merge_lora(stage_c)
        self.records["stage_c"] |= {"lora": path, "lora_sha256": sha}

    # --- lazily loaded models -------------------------------------------------------------------------------
    def with_vision(self) -> CascadeModels:
        """The bundle with its CLIP vision tower (image variation), loaded on first use."""
        with self._lock:
            if self.cascade.vision is None:
                flavor = self.flavors["clip_vision"]
                files = self._weights_files(
                    {"clip_vision": flavor} if self._from_weights("clip_vision") else {}
                )
                vision = self._place(self._build("clip_vision", flavor, files.get("clip_vision")))
                assert isinstance(vision, ClipVisionConditioner)
                self.cascade.vision = vision
        return self.cascade

    def controlnet(self, kind: str) -> ControlNet:
        """The ControlNet of ``kind`` (``canny``, ``inpainting``, ``super_resolution``), loaded on first use:
        a ``train-controlnet`` checkpoint's, else the released file in the weights folder, or the tiny one."""
        with self._lock:
            if kind not in self._controlnets:
                self._controlnets[kind] = self._load_controlnet(kind)
        return self._controlnets[kind]

    def _load_controlnet(self, kind: str) -> ControlNet:
        role = f"controlnet/{kind}"
        flavor = role + ("/tiny" if self.tiny else "")
        ckpt = self.checkpoints.get("controlnet")
        if ckpt is not None:
            try:
                model = self._build(role, flavor, ckpt.file("controlnet"))
            except WeightsError as err:
                raise WeightsError(
                    f"--checkpoint {ckpt.path} holds no {kind} ControlNet ({flavor}): {err}"
                ) from None
        else:
            files = {} if self.tiny else self._weights_files({role: flavor})
            model = self._build(role, flavor, files.get(role))
        assert isinstance(model, ControlNet)
        return self._place(model)

    # --- what was used ------------------------------------------------------------------------------------
    def describe(self, roles: list[str]) -> dict[str, Any]:
        """The models of ``roles`` (flavor, weights, sha256 or "random"), the checkpoints, device and dtype,
        and whether any of them is random (``random_weights``, ``random_models``)."""
        models = {role: self.records[role] for role in roles}
        random = [f"{role}={rec['flavor']}" for role, rec in models.items() if rec["sha256"] == RANDOM]
        return {
            "models": models,
            "checkpoints": [dataclasses.asdict(c) for c in self.checkpoints.values()],
            "random_weights": bool(random),
            "random_models": random,
            "device": str(self.device),
            "dtype": self.source.dtype,
        }  # fmt: skip


def random_banner(random_models: list[str]) -> str | None:
    """The line every output made with random weights carries, or None."""
    if not random_models:
        return None
    return (
        f"RANDOM WEIGHTS: {', '.join(random_models)} (seeded random init, no weights file): the images test "
        "the pipeline, not Stable Cascade"
    )


def _exists(path: str) -> bool:
    fs, root = fsspec.core.url_to_fs(path)
    return fs.exists(root)


@functools.lru_cache(maxsize=1)
def load_models(source: ModelSource) -> SampleModels:
    """The models of ``source``, built once: the last source's bundle is cached (one set of multi-GB models in
    memory; ``load_models.cache_clear()`` frees it). Every mistake raises before any big file is read: an
    unknown flavor, a missing folder or file (named), a checkpoint of another flavor, mixed tiny and released
    flavors; a weights file that does not fit its flavor names itself (``stages.weights.WeightsError``)."""
    return SampleModels(source)
