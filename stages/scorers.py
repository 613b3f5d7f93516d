"""One CLIP ViT-L/14 image pass (open_clip) per image: embedding, LAION aesthetic score, CLIP score.

:meth:`ClipScorer.score` runs the vision tower once on the official clip_preprocess (the shared
:meth:`stages.conditioners.ClipVisionConditioner.preprocess`) and returns ``image_embeds``, the unnormalised
projected embedding, equal to transformers' ``CLIPVisionModelWithProjection(...).image_embeds`` for the same
weights (:func:`open_clip_vision_to_hf`), i.e. Stage C's ``clip_img``, so encoding can reuse it; the LAION
aesthetic v2 score of the L2-normalised embedding; and the cosine of the normalised image and text features
(no logit scale). An empty caption is tokenised as ``<sot><eot>`` and scored like any text (a
caption-independent value: filter empty captions by a caption rule, not by this score).

Nothing downloads: models come from a config (seeded random init) or local files (pickles: weights_only).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from open_clip.tokenizer import SimpleTokenizer
from safetensors.torch import load_file
from torch import nn

from stages.conditioners import VISION_FLAVORS, ClipVisionConditioner, ClipVisionConfig
from stages.tokenizer import CONTEXT_LENGTH, VOCAB_SIZE
from stages.weights import WeightsError, check_state_dict, sha256_of

PathLike = str | os.PathLike


@dataclass(frozen=True, kw_only=True)
class ClipScorerConfig:
    """Architecture of an open_clip CLIP (vision + text tower); the embedding size is ``vision.projection_dim``.

    ``vision`` is the conditioner's :class:`ClipVisionConfig` (tower and preprocessing). The text tower has CLIP's
    BPE (49408 tokens, context 77) and the vision activation (open_clip's ``quick_gelu`` covers both towers).
    """

    vision: ClipVisionConfig
    text_width: int
    text_layers: int
    text_heads: int
    text_mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        name = type(self).__name__
        if not isinstance(self.vision, ClipVisionConfig):
            raise TypeError(f"{name}.vision is {type(self.vision).__name__}, must be ClipVisionConfig")
        if self.vision.layer_norm_eps != 1e-5:  # open_clip's LayerNorm
            raise ValueError(f"{name}.vision.layer_norm_eps={self.vision.layer_norm_eps}: must be 1e-5")
        for field in ("text_width", "text_layers", "text_heads"):
            if not isinstance(getattr(self, field), int) or getattr(self, field) < 1:
                raise ValueError(f"{name}.{field}={getattr(self, field)!r}: must be a positive int")
        if self.text_width % self.text_heads:
            raise ValueError(f"{name}.text_width={self.text_width}: must be divisible by text_heads")
        if not isinstance(self.text_mlp_ratio, int | float) or self.text_mlp_ratio <= 0:
            raise ValueError(f"{name}.text_mlp_ratio={self.text_mlp_ratio!r}: must be positive")

    @property
    def embed_dim(self) -> int:
        return self.vision.projection_dim

    def build_clip(self) -> CLIP:
        """A random-init open_clip ``CLIP`` of this architecture."""
        v, w = self.vision, self.vision.hidden_size
        # fmt: off
        vision = CLIPVisionCfg(
            layers=v.num_hidden_layers, width=w, head_width=w // v.num_attention_heads,
            mlp_ratio=v.intermediate_size / w, patch_size=v.patch_size_px, image_size=v.image_size_px,
        )
        text = CLIPTextCfg(
            context_length=CONTEXT_LENGTH, vocab_size=VOCAB_SIZE, width=self.text_width, heads=self.text_heads,
            layers=self.text_layers, mlp_ratio=self.text_mlp_ratio,
        )
        # fmt: on
        return CLIP(v.projection_dim, vision, text, quick_gelu=v.hidden_act == "quick_gelu")


FLAVORS: dict[str, ClipScorerConfig] = {
    # open_clip "ViT-L-14" for OpenAI weights (quick_gelu): 427,616,513 parameters, 768-d embedding.
    "clip_score/l14": ClipScorerConfig(
        vision=VISION_FLAVORS["clip_vision/l14"], text_width=768, text_layers=12, text_heads=12
    ),
    # Same input, preprocessing and real vocabulary; 2 narrow layers per tower, 32-d embedding.
    "clip_score/tiny": ClipScorerConfig(
        vision=VISION_FLAVORS["clip_vision/tiny"], text_width=32, text_layers=2, text_heads=2
    ),
}


class AestheticHead(nn.Module):
    """LAION improved-aesthetic-predictor v2 MLP (upstream keys ``layers.{0,2,4,6,7}``; no activations upstream).

    Input: L2-normalised CLIP image embeddings (B, input_dim); output: scores (B, 1), roughly 1–10.
    """

    def __init__(self, input_dim: int = 768) -> None:
        super().__init__()
        self.input_dim = input_dim
        # fmt: off
        self.layers = nn.Sequential(
            nn.Linear(input_dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )
        # fmt: on

    def forward(self, embeds_normalized: torch.Tensor) -> torch.Tensor:
        return self.layers(embeds_normalized)


def read_local_state_dict(path: PathLike) -> tuple[dict[str, torch.Tensor], str]:
    """Read a local ``.safetensors`` or pickled (``weights_only=True``) state dict; returns (state, sha256).

    URLs, hub names (``"ViT-L-14"``, ``"openai"``, ``"hf-hub:..."``) and missing files are refused.
    """
    text = os.fspath(path)
    local = Path(text).expanduser()
    if "://" in text or text.startswith("hf-hub:") or not local.is_file():
        raise ValueError(f"path={text!r}: not an existing local file (URLs, model and hub names are refused)")
    if local.suffix == ".safetensors":
        state: Any = load_file(local, device="cpu")
    else:
        try:
            state = torch.load(local, map_location="cpu", weights_only=True)
        except Exception as exc:  # unpickling refused or not a torch file
            hint = "TorchScript (OpenAI's ViT-L-14.pt) is refused: use open_clip_pytorch_model.bin"
            raise WeightsError(f"{text}: not loadable with weights_only=True ({exc!r:.200}); {hint}") from exc
    state = state.get("state_dict", state) if isinstance(state, dict) else state  # training checkpoints
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{text}: not a flat state dict of tensors")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    return state, sha256_of(local)


def load_aesthetic_head(path: PathLike) -> tuple[AestheticHead, str]:
    """Load the v2 aesthetic head strictly from a local ``.pth`` or ``.safetensors``; returns (head, sha256)."""
    state, sha = read_local_state_dict(path)
    head = AestheticHead(state["layers.0.weight"].shape[-1] if "layers.0.weight" in state else 768)
    check_state_dict(head, state, os.fspath(path))
    head.load_state_dict(state, strict=True)
    return head.eval().requires_grad_(False), sha


_HF_RENAMES = (  # open_clip ViT key pattern → transformers CLIPVisionModelWithProjection key
    (r"class_embedding", "embeddings.class_embedding"),
    (r"positional_embedding", "embeddings.position_embedding.weight"),
    (r"conv1\.weight", "embeddings.patch_embedding.weight"),
    (r"ln_pre\.(\w+)", r"pre_layrnorm.\1"),
    (r"ln_post\.(\w+)", r"post_layernorm.\1"),
    (r"transformer\.resblocks\.(\d+)\.ln_(\d)\.(\w+)", r"encoder.layers.\1.layer_norm\2.\3"),
    (r"transformer\.resblocks\.(\d+)\.attn\.out_proj\.(\w+)", r"encoder.layers.\1.self_attn.out_proj.\2"),
    (r"transformer\.resblocks\.(\d+)\.mlp\.c_fc\.(\w+)", r"encoder.layers.\1.mlp.fc1.\2"),
    (r"transformer\.resblocks\.(\d+)\.mlp\.c_proj\.(\w+)", r"encoder.layers.\1.mlp.fc2.\2"),
)


def open_clip_vision_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip ViT weights (``model.visual`` or full CLIP state dict) → ``CLIPVisionModelWithProjection`` keys.

    ``in_proj`` splits into q/k/v; ``proj`` (width, embed) is transposed into ``visual_projection.weight``.
    The result loads strictly into ``CLIPVisionModelWithProjection(ClipScorerConfig.vision.to_hf())``.
    """
    if any(k.startswith("visual.") for k in state):
        state = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
    out = {}
    for key, value in state.items():
        if key == "proj":
            out["visual_projection.weight"] = value.t().contiguous()
        elif match := re.fullmatch(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", key):
            for name, part in zip("qkv", value.chunk(3), strict=True):
                out[f"vision_model.encoder.layers.{match[1]}.self_attn.{name}_proj.{match[2]}"] = part.clone()
        else:
            new = next((re.sub(p, r, key) for p, r in _HF_RENAMES if re.fullmatch(p, key)), None)
            if new is None:
                raise ValueError(f"open_clip_vision_to_hf: unsupported key {key!r} (only plain ViT towers)")
            out["vision_model." + new] = value
    return out


class ScoreOutput(NamedTuple):
    """Per-image outputs of one :meth:`ClipScorer.score` call, float32 on the scorer's device."""

    image_embeds: torch.Tensor  # (B, D) unnormalised projected embedding = HF image_embeds = Stage C clip_img
    image_embeds_normalized: torch.Tensor  # (B, D) unit L2 norm
    aesthetic: torch.Tensor  # (B,) LAION aesthetic v2 score
    clip_similarity: torch.Tensor  # (B,) cosine(image, caption) in [-1, 1]


@dataclass(frozen=True)
class _Preprocessor:
    """Runs the official :meth:`ClipVisionConditioner.preprocess` without building a transformers model."""

    config: ClipVisionConfig
    preprocess = ClipVisionConditioner.preprocess


@lru_cache(maxsize=1)
def _tokenizer() -> SimpleTokenizer:
    return SimpleTokenizer(context_length=CONTEXT_LENGTH)  # ships its BPE file: works offline


class ClipScorer(nn.Module):
    """open_clip CLIP + aesthetic head, frozen and in eval mode.

    Args:
        config: Architecture (e.g. ``FLAVORS["clip_score/l14"]``).
        seed: Seed of the random init (the RNG state outside is left untouched).
        autocast_dtype: Run both towers under ``torch.autocast`` (e.g. ``torch.bfloat16`` on CUDA).
    """

    def __init__(
        self, config: ClipScorerConfig, *, seed: int = 0, autocast_dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        if not isinstance(config, ClipScorerConfig):
            raise TypeError(f"config is {type(config).__name__}, must be ClipScorerConfig")
        self.config = config
        self.autocast_dtype = autocast_dtype
        self.clip_sha256: str | None = None  # set by load(); None = random init
        self.aesthetic_sha256: str | None = None
        self._preprocessor = _Preprocessor(config.vision)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.clip = config.build_clip()
            self.aesthetic = AestheticHead(config.embed_dim)
        self.requires_grad_(False)
        self.train(False)

    @classmethod
    def load(
        cls, config: ClipScorerConfig, *, clip_weights: PathLike, aesthetic_weights: PathLike, **kwargs: Any
    ) -> ClipScorer:
        """Strictly load open_clip weights and the aesthetic head from local files, on CPU (then ``.to(device)``).

        ``clip_weights``: e.g. ``open_clip_pytorch_model.bin``/``.safetensors`` of ViT-L-14 openai; ``kwargs`` go to
        the constructor (``autocast_dtype``).
        """
        state, clip_sha = read_local_state_dict(clip_weights)
        head, head_sha = load_aesthetic_head(aesthetic_weights)
        if head.input_dim != config.embed_dim:
            raise ValueError(f"aesthetic head input {head.input_dim} != config.embed_dim={config.embed_dim}")
        with torch.device("meta"):
            scorer = cls(config, **kwargs)  # no wasted random init
        check_state_dict(scorer.clip, state, os.fspath(clip_weights))
        scorer.clip.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
        scorer.aesthetic = head
        mask = torch.full_like(scorer.clip.attn_mask, float("-inf"), device="cpu")  # non-persistent: on meta
        scorer.clip.attn_mask = mask.triu_(1)
        scorer.clip_sha256, scorer.aesthetic_sha256 = clip_sha, head_sha
        return scorer

    def train(self, mode: bool = True) -> ClipScorer:
        """Always eval: the scorer is frozen (dropout in the aesthetic head stays off)."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return self.clip.logit_scale.device

    def preprocess(self, images_01: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """Official clip_preprocess (:class:`ClipVisionConditioner`'s): (B, 3, S, S); spec: ``config.vision``."""
        return self._preprocessor.preprocess(images_01)

    def tokenize(self, captions: Sequence[str]) -> torch.Tensor:
        """open_clip tokenisation: (B, context_length) int64, padded with 0, truncated with eot kept last."""
        if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
            raise TypeError("captions must be a sequence of str")
        return _tokenizer()(list(captions))

    @torch.no_grad()
    def score(self, images_01: torch.Tensor | Sequence[torch.Tensor], captions: Sequence[str]) -> ScoreOutput:
        """Score images (float RGB in [0, 1], (B, 3, H, W) or a list of (3, H, W)) against their captions.

        One vision and one text pass per call; the outputs are described in the module docstring.
        """
        tokens = self.tokenize(captions)
        if len(tokens) != len(images_01):
            raise ValueError(f"{len(images_01)} images but {len(tokens)} captions: one caption per image")
        dev, dtype = self.device, self.autocast_dtype
        images = images_01.to(dev) if torch.is_tensor(images_01) else [i.to(dev) for i in images_01]
        pixels = self.preprocess(images)
        with torch.autocast(dev.type, dtype=dtype) if dtype else contextlib.nullcontext():
            embeds = self.clip.encode_image(pixels.to(self.clip.visual.conv1.weight.dtype)).float()
            text = self.clip.encode_text(tokens.to(dev)).float()
        normalized = F.normalize(embeds, dim=-1)
        aesthetic = self.aesthetic(normalized.to(self.aesthetic.layers[0].weight.dtype)).float().squeeze(-1)
        similarity = (normalized * F.normalize(text, dim=-1)).sum(-1).clamp(-1.0, 1.0)
        return ScoreOutput(embeds, normalized, aesthetic, similarity)

    forward = score
