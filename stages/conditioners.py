"""Stable Cascade's text and image conditioners: CLIP ViT-bigG-14 text and OpenAI CLIP ViT-L/14 vision.

Both wrap the transformers models the official code uses (spec §3 "One Stage C step", facts 2 and 3):

- text: ``CLIPTextModelWithProjection`` called with the 77-token ids *and* attention mask and
  ``output_hidden_states=True``; ``clip_text = hidden_states[-1]`` (B, 77, 1280), the last encoder layer
  **before** ``final_layer_norm``; ``clip_text_pooled = text_embeds.unsqueeze(1)`` (B, 1, 1280);
- image: ``CLIPVisionModelWithProjection(clip_preprocess(images)).image_embeds`` (B, 768), with clip_preprocess =
  Resize(224, bicubic) on the short side → CenterCrop(224) → Normalize(CLIP mean/std).

Models are built from a flavor (random init) or loaded from a *local* HF directory; nothing is ever downloaded.
They stay frozen and in eval mode unless built with ``trainable=True``. Outputs are float32 whatever the weight
dtype or autocast, so callers choose the storage precision.

Pooling (text): the released bigG config (as copied into SDXL's ``text_encoder_2``) carries the legacy
``eos_token_id = 2``, which makes transformers pool at ``argmax(input_ids)``. With the stock vocabulary this is
the eos token (49407 is the largest id; padding is 0). With ReToken ids (≥ 49408) it is the first added token,
exactly as in the official code. ``legacy_argmax_pooling=False`` pools at the first eos (49407) instead.

Resize antialiasing: the official code applied ``torchvision.transforms.Resize`` to tensors without an
``antialias`` argument. Since torchvision 0.17 that means antialias=True (0.16 defaulted to no antialiasing for
tensors); True also matches PIL's bicubic used by CLIP's own preprocessing. ``ClipVisionConfig.antialias``
records the choice and is part of :meth:`ClipVisionConfig.preprocess_spec`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torchvision.transforms.functional as TF
from torch import nn
from torchvision.transforms import InterpolationMode
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from stages.tokenizer import CONTEXT_LENGTH, clip_tokenizer, tokenize_captions
from stages.weights import sha256_of

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "FLAVORS",
    "TEXT_FLAVORS",
    "VISION_FLAVORS",
    "ClipTextConditioner",
    "ClipTextConfig",
    "ClipTextOutput",
    "ClipVisionConditioner",
    "ClipVisionConfig",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_ACTS = ("gelu", "quick_gelu")
_LEGACY_EOS_ID = 2  # the value in released pre-2023 CLIP configs; selects argmax pooling in transformers
_EOS_ID = 49407


def _validate_common(obj: Any, names: Sequence[str]) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{type(obj).__name__}.{name}={value!r}: must be a positive int")
    if obj.hidden_size % obj.num_attention_heads:
        raise ValueError(
            f"{type(obj).__name__}.hidden_size={obj.hidden_size}: must be divisible by "
            f"num_attention_heads={obj.num_attention_heads}"
        )
    if obj.hidden_act not in _ACTS:
        raise ValueError(f"{type(obj).__name__}.hidden_act={obj.hidden_act!r}: must be one of {_ACTS}")
    if not 0 < obj.layer_norm_eps < 1:
        raise ValueError(f"{type(obj).__name__}.layer_norm_eps={obj.layer_norm_eps!r}: must be in (0, 1)")


@dataclass(frozen=True, kw_only=True)
class ClipTextConfig:
    """Architecture of a CLIP text tower with projection (transformers ``CLIPTextConfig`` fields).

    Attributes:
        legacy_argmax_pooling: True pools at ``argmax(input_ids)`` as the released bigG config does
            (``eos_token_id=2``); False pools at the first eos (49407). See the module docstring.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    projection_dim: int
    max_position_embeddings: int
    hidden_act: str
    layer_norm_eps: float
    legacy_argmax_pooling: bool = True

    def __post_init__(self) -> None:
        ints = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        _validate_common(self, (*ints, "projection_dim", "max_position_embeddings"))
        if self.max_position_embeddings < CONTEXT_LENGTH:
            raise ValueError(
                f"ClipTextConfig.max_position_embeddings={self.max_position_embeddings}: must be >= {CONTEXT_LENGTH}"
            )

    def to_hf(self) -> CLIPTextConfig:
        """The equivalent transformers config (token ids as in the released bigG config when legacy)."""
        fields = asdict(self)
        legacy = fields.pop("legacy_argmax_pooling")
        if legacy:  # the special-token fields of the released config (only eos_token_id changes behaviour)
            ids = {"bos_token_id": 0, "eos_token_id": _LEGACY_EOS_ID, "pad_token_id": 1}
        else:
            ids = {"bos_token_id": 49406, "eos_token_id": _EOS_ID, "pad_token_id": 0}
        return CLIPTextConfig(**fields, **ids, attention_dropout=0.0, dropout=0.0)

    @classmethod
    def from_hf(cls, hf: CLIPTextConfig) -> ClipTextConfig:
        """Read the architecture back from a transformers config (e.g. of loaded weights)."""
        names = [f for f in cls.__dataclass_fields__ if f != "legacy_argmax_pooling"]
        return cls(
            **{n: getattr(hf, n) for n in names}, legacy_argmax_pooling=hf.eos_token_id == _LEGACY_EOS_ID
        )


@dataclass(frozen=True, kw_only=True)
class ClipVisionConfig:
    """Architecture of a CLIP vision tower with projection, plus its input preprocessing.

    Attributes:
        image_size_px: Model input side; preprocessing resizes the short side to it and center-crops.
        patch_size_px: ViT patch side; must divide ``image_size_px``.
        antialias: Antialiased bicubic resize (see the module docstring).
    """

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    projection_dim: int
    image_size_px: int
    patch_size_px: int
    hidden_act: str
    layer_norm_eps: float
    antialias: bool = True

    def __post_init__(self) -> None:
        ints = (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "projection_dim",
        )
        _validate_common(self, (*ints, "image_size_px", "patch_size_px"))
        if self.image_size_px % self.patch_size_px:
            raise ValueError(
                f"ClipVisionConfig.patch_size_px={self.patch_size_px}: must divide image_size_px={self.image_size_px}"
            )

    def to_hf(self) -> CLIPVisionConfig:
        """The equivalent transformers config."""
        fields = asdict(self)
        fields.pop("antialias")
        fields["image_size"], fields["patch_size"] = fields.pop("image_size_px"), fields.pop("patch_size_px")
        return CLIPVisionConfig(**fields, num_channels=3, attention_dropout=0.0)

    @classmethod
    def from_hf(cls, hf: CLIPVisionConfig, *, antialias: bool = True) -> ClipVisionConfig:
        """Read the architecture back from a transformers config."""
        names = [
            f for f in cls.__dataclass_fields__ if f not in ("antialias", "image_size_px", "patch_size_px")
        ]
        kw = {n: getattr(hf, n) for n in names}
        return cls(**kw, image_size_px=hf.image_size, patch_size_px=hf.patch_size, antialias=antialias)

    def preprocess_spec(self) -> dict[str, Any]:
        """Everything that defines :meth:`ClipVisionConditioner.preprocess` (for preprocessing hashes)."""
        return {
            "resize_short_side_px": self.image_size_px,
            "interpolation": "bicubic",
            "antialias": self.antialias,
            "center_crop_px": self.image_size_px,
            "mean": list(CLIP_MEAN),
            "std": list(CLIP_STD),
        }


TEXT_FLAVORS: dict[str, ClipTextConfig] = {
    # laion/CLIP-ViT-bigG-14-laion2B-39B-b160k text tower: 694,659,840 parameters.
    "clip_text/bigg": ClipTextConfig(
        vocab_size=49408,
        hidden_size=1280,
        intermediate_size=5120,
        num_hidden_layers=32,
        num_attention_heads=20,
        projection_dim=1280,
        max_position_embeddings=77,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
    ),
    # Same vocabulary (the real tokenizer works), 77 positions, 2 narrow layers: ~1.6M parameters.
    "clip_text/tiny": ClipTextConfig(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        projection_dim=32,
        max_position_embeddings=77,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
    ),
}

VISION_FLAVORS: dict[str, ClipVisionConfig] = {
    # openai/clip-vit-large-patch14 vision tower: 303,966,208 parameters.
    "clip_vision/l14": ClipVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        projection_dim=768,
        image_size_px=224,
        patch_size_px=14,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    ),
    # Same 224 px input and preprocessing, 7×7 patches of 32 px, 2 narrow layers: ~0.12M parameters.
    "clip_vision/tiny": ClipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        projection_dim=32,
        image_size_px=224,
        patch_size_px=32,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    ),
}

FLAVORS: dict[str, ClipTextConfig | ClipVisionConfig] = {**TEXT_FLAVORS, **VISION_FLAVORS}


def _flavor(name: str, kind: type) -> Any:
    config = FLAVORS.get(name)
    if not isinstance(config, kind):
        allowed = sorted(k for k, v in FLAVORS.items() if isinstance(v, kind))
        raise ValueError(f"flavor={name!r}: not a {kind.__name__} flavor; allowed: {allowed}")
    return config


def _local_model_dir(path: str | os.PathLike) -> tuple[Path, list[Path]]:
    """Validate a local HF model folder; refuse URLs and hub ids (nothing is fetched) and pickles.

    Returns:
        The folder and the safetensors files transformers will read: ``model.safetensors``, or the shards
        named by ``model.safetensors.index.json``.
    """
    text = os.fspath(path)
    if "://" in text or text.startswith("hf:"):
        raise ValueError(f"path={text!r}: must be a local directory; remote URLs are refused (no downloads)")
    local = Path(text).expanduser()
    if not local.is_dir():
        raise ValueError(
            f"path={text!r}: not an existing local directory (hub ids such as 'laion/...' are refused: "
            "download the HF folder with config.json + model.safetensors yourself and pass its path)"
        )
    if not (local / "config.json").is_file():
        raise ValueError(f"path={text!r}: no config.json in this directory (expected an HF model folder)")
    if (local / "model.safetensors").is_file():
        return local, [local / "model.safetensors"]
    index = local / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return local, [local / name for name in shards]
    raise ValueError(
        f"path={text!r}: no model.safetensors (or its index); pickled .bin weights are never loaded"
    )


def _weights_sha256(files: list[Path]) -> str:
    """sha256 of the single weights file, or of the ``name sha256`` lines of a sharded folder."""
    if len(files) == 1:
        return sha256_of(files[0])
    lines = "".join(f"{f.name} {sha256_of(f)}\n" for f in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def _load_strict(model_cls: type, path: str | os.PathLike, dtype: torch.dtype | None) -> tuple[Any, str]:
    """``from_pretrained`` from a local folder only; missing weights are an error, not a random init.

    Keys of the other tower (a full ``CLIPModel`` folder) are ignored. Returns (model, weights sha256).
    """
    local, files = _local_model_dir(path)
    model, info = model_cls.from_pretrained(
        local, local_files_only=True, use_safetensors=True, dtype=dtype, output_loading_info=True
    )
    missing = sorted(info.get("missing_keys") or [])
    mismatched = info.get("mismatched_keys") or []
    if missing or mismatched:
        shown = ", ".join(map(str, [*missing, *mismatched][:8]))
        raise ValueError(f"{local}: weights do not fit {model_cls.__name__}: missing/mismatched {shown}")
    return model, _weights_sha256(files)


def _check_architecture(expected: Any, got: Any, path: str | os.PathLike, ignore: tuple[str, ...]) -> None:
    diff = [
        f"{f}={getattr(got, f)!r} (flavor: {getattr(expected, f)!r})"
        for f in expected.__dataclass_fields__
        if f not in ignore and getattr(got, f) != getattr(expected, f)
    ]
    if diff:
        raise ValueError(f"{os.fspath(path)}: weights do not match the flavor: " + ", ".join(diff))


class _FrozenWrapper(nn.Module):
    """Shared behaviour: frozen unless trainable, eval unless trainable, optional autocast."""

    def __init__(self, *, trainable: bool, autocast_dtype: torch.dtype | None) -> None:
        super().__init__()
        self.trainable = trainable
        self.autocast_dtype = autocast_dtype
        self.weights_sha256: str | None = None  # set when loaded from a folder; None = random init

    def _finish_init(self) -> None:
        self.model.requires_grad_(self.trainable)
        self.train(False)

    def train(self, mode: bool = True) -> _FrozenWrapper:
        """Switch to train mode only when built with ``trainable=True``; frozen encoders stay in eval."""
        return super().train(mode and self.trainable)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None or device.type == "meta":
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)


class ClipTextOutput(NamedTuple):
    """Stable Cascade's text conditions."""

    clip_text: torch.Tensor  # (B, 77, hidden_size), pre-final-LN last layer
    clip_text_pooled: torch.Tensor  # (B, 1, projection_dim)


class ClipTextConditioner(_FrozenWrapper):
    """CLIP text tower producing ``clip_text`` and ``clip_text_pooled`` as the official Stage C code does.

    Args:
        config: Architecture (e.g. ``FLAVORS["clip_text/bigg"]``).
        tokenizer: Defaults to :func:`stages.tokenizer.clip_tokenizer` (the official HF laion behaviour).
        model: An already-built HF model matching ``config`` (used by :meth:`load_pretrained`); default random init.
        trainable: Keep gradients and allow train mode (e.g. ReToken LoRA); default frozen and eval.
        autocast_dtype: Run the forward under ``torch.autocast`` with this dtype (e.g. ``torch.bfloat16`` on CUDA).
    """

    def __init__(
        self,
        config: ClipTextConfig,
        *,
        tokenizer: CLIPTokenizer | None = None,
        model: CLIPTextModelWithProjection | None = None,
        trainable: bool = False,
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(trainable=trainable, autocast_dtype=autocast_dtype)
        if not isinstance(config, ClipTextConfig):
            raise TypeError(f"config is {type(config).__name__}, must be ClipTextConfig")
        if tokenizer is not None and len(tokenizer) > config.vocab_size:
            raise ValueError(
                f"tokenizer has {len(tokenizer)} tokens but vocab_size={config.vocab_size}: build the config "
                "with the larger vocab_size (or resize_token_embeddings) for added tokens"
            )
        self.config = config
        self._tokenizer = tokenizer
        self.model = model if model is not None else CLIPTextModelWithProjection(config.to_hf())
        self._finish_init()

    @classmethod
    def from_flavor(cls, flavor: str, **kwargs: Any) -> ClipTextConditioner:
        """Random-init conditioner of a named flavor (``clip_text/bigg`` or ``clip_text/tiny``)."""
        return cls(_flavor(flavor, ClipTextConfig), **kwargs)

    @classmethod
    def load_pretrained(
        cls, path: str | os.PathLike, *, dtype: torch.dtype | None = None, **kwargs: Any
    ) -> ClipTextConditioner:
        """Load weights from a local HF folder (config.json + model.safetensors; a full CLIPModel folder works).

        Pooling follows the folder's config (``eos_token_id`` 2 = legacy argmax), as with the official code.
        """
        model, sha = _load_strict(CLIPTextModelWithProjection, path, dtype)
        cond = cls(ClipTextConfig.from_hf(model.config), model=model, **kwargs)
        cond.weights_sha256 = sha
        return cond

    @classmethod
    def from_local_dir(
        cls, config: ClipTextConfig, path: str | os.PathLike, **kwargs: Any
    ) -> ClipTextConditioner:
        """:meth:`load_pretrained`, checking that the folder holds the architecture of ``config``."""
        cond = cls.load_pretrained(path, **kwargs)
        _check_architecture(config, cond.config, path, ignore=("legacy_argmax_pooling",))
        if cond.config.legacy_argmax_pooling != config.legacy_argmax_pooling:
            warnings.warn(
                f"{os.fspath(path)}: legacy_argmax_pooling={cond.config.legacy_argmax_pooling} from the folder's "
                f"config.json overrides the flavor's {config.legacy_argmax_pooling} (same result without added tokens)",
                stacklevel=2,
            )
        return cond

    @property
    def tokenizer(self) -> CLIPTokenizer:
        if self._tokenizer is None:
            self._tokenizer = clip_tokenizer()
        return self._tokenizer

    def tokenize(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        """Captions → ``input_ids`` and ``attention_mask`` (B, 77), padded with id 0."""
        return tokenize_captions(self.tokenizer, captions)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> ClipTextOutput:
        """Token ids and mask (B, 77) → (clip_text (B, 77, H), clip_text_pooled (B, 1, P)), float32."""
        if input_ids.ndim != 2 or input_ids.shape != attention_mask.shape:
            raise ValueError(
                f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} "
                "must both be (B, seq_len)"
            )
        n_embeddings = self.model.get_input_embeddings().num_embeddings  # grows with added (ReToken) tokens
        if input_ids.device.type == "cpu" and input_ids.numel() and int(input_ids.max()) >= n_embeddings:
            raise ValueError(
                f"token id {int(input_ids.max())} >= {n_embeddings} token embeddings: added tokens need "
                "model.resize_token_embeddings(len(tokenizer)) first"
            )
        device = self.device
        with self._autocast(device):
            out = self.model(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                output_hidden_states=True,
            )
        return ClipTextOutput(out.hidden_states[-1].float(), out.text_embeds.unsqueeze(1).float())

    def forward(self, captions: Sequence[str]) -> ClipTextOutput:
        """Captions → Stable Cascade's text conditions (see :meth:`encode`)."""
        tokens = self.tokenize(captions)
        return self.encode(tokens["input_ids"], tokens["attention_mask"])


class ClipVisionConditioner(_FrozenWrapper):
    """CLIP vision tower producing Stable Cascade's ``clip_img`` from RGB images in [0, 1].

    Args:
        config: Architecture and preprocessing (e.g. ``FLAVORS["clip_vision/l14"]``).
        model: An already-built HF model matching ``config``; default random init.
        trainable: Keep gradients and allow train mode; default frozen and eval.
        autocast_dtype: Run the forward under ``torch.autocast`` with this dtype.
    """

    def __init__(
        self,
        config: ClipVisionConfig,
        *,
        model: CLIPVisionModelWithProjection | None = None,
        trainable: bool = False,
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(trainable=trainable, autocast_dtype=autocast_dtype)
        if not isinstance(config, ClipVisionConfig):
            raise TypeError(f"config is {type(config).__name__}, must be ClipVisionConfig")
        self.config = config
        self.model = model if model is not None else CLIPVisionModelWithProjection(config.to_hf())
        self._finish_init()

    @classmethod
    def from_flavor(cls, flavor: str, **kwargs: Any) -> ClipVisionConditioner:
        """Random-init conditioner of a named flavor (``clip_vision/l14`` or ``clip_vision/tiny``)."""
        return cls(_flavor(flavor, ClipVisionConfig), **kwargs)

    @classmethod
    def load_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        dtype: torch.dtype | None = None,
        antialias: bool = True,
        **kwargs: Any,
    ) -> ClipVisionConditioner:
        """Load weights from a local HF folder (config.json + model.safetensors; a full CLIPModel folder works)."""
        model, sha = _load_strict(CLIPVisionModelWithProjection, path, dtype)
        cond = cls(ClipVisionConfig.from_hf(model.config, antialias=antialias), model=model, **kwargs)
        cond.weights_sha256 = sha
        return cond

    @classmethod
    def from_local_dir(
        cls, config: ClipVisionConfig, path: str | os.PathLike, **kwargs: Any
    ) -> ClipVisionConditioner:
        """:meth:`load_pretrained` with the preprocessing of ``config``, checking the folder's architecture."""
        cond = cls.load_pretrained(path, antialias=config.antialias, **kwargs)
        _check_architecture(config, cond.config, path, ignore=())
        return cond

    def preprocess(self, images: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """Official clip_preprocess: Resize(S, bicubic) short side → CenterCrop(S) → CLIP Normalize.

        Args:
            images: Float RGB in [0, 1], a (B, 3, H, W) batch or a sequence of (3, H, W) images of any sizes.

        Returns:
            (B, 3, S, S) normalised pixels, S = ``config.image_size_px``, on the input's device.
        """
        if not isinstance(images, torch.Tensor):
            images = list(images)
            if not images:
                raise ValueError("images is empty")
            return torch.cat([self.preprocess(img.unsqueeze(0)) for img in images])
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W) or a list of (3, H, W), got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise TypeError(f"images dtype {images.dtype}: convert to float in [0, 1] first")
        lo, hi = float(images.min()), float(images.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(f"images range [{lo:.3g}, {hi:.3g}]: expected RGB in [0, 1]")
        size = self.config.image_size_px
        x = TF.resize(
            images, [size], interpolation=InterpolationMode.BICUBIC, antialias=self.config.antialias
        )
        x = TF.center_crop(x, [size, size])
        return TF.normalize(x, mean=list(CLIP_MEAN), std=list(CLIP_STD))

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Preprocessed pixels (B, 3, S, S) → ``image_embeds`` (B, projection_dim), float32."""
        device = self.device
        with self._autocast(device):
            out = self.model(pixel_values=pixel_values.to(device=device, dtype=self.dtype))
        return out.image_embeds.float()

    def forward(self, images: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """RGB images in [0, 1] → ``image_embeds`` (B, projection_dim)."""
        return self.encode(self.preprocess(images))

    def clip_img(self, images: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """RGB images in [0, 1] → Stage C's ``clip_img`` condition (B, 1, projection_dim)."""
        return self(images).unsqueeze(1)
