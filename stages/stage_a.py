"""Stage A: Stable Cascade's VQGAN (pixels in [0, 1] <-> 4×H/4×W/4 latents).

Checkpoint-compatible with the official ``stage_a.safetensors`` (flat state dict, no prefix). The architecture
is described in ``reference/stable-cascade.md`` §1.4; diffusers' ``PaellaVQModel`` is the same network with
``vquantizer.embedding.weight`` in place of ``vquantizer.codebook.weight``.

Latent convention: :meth:`StageA.encode` returns the *scaled* latent ``raw / scale_factor`` (what Stage B is
trained on) and :meth:`StageA.decode` undoes that scaling before decoding. The ``*_unscaled`` methods work on the
raw bottleneck output (what diffusers' ``PaellaVQModel.encode`` returns). The codebook is not used on either
path; ``encode(images, quantize=True)`` (quantized and unquantized latents, indices, VQ loss, like the official
``encode(x, quantize=True)``) and :meth:`StageA.quantize` expose it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple, overload

import torch
from torch import nn

__all__ = [
    "COMMITMENT_BETA",
    "FLAVORS",
    "ResBlockA",
    "StageA",
    "StageAConfig",
    "StageAEncoding",
    "VectorQuantizer",
]

#: β of the VQ commitment loss used by :meth:`StageA.encode` with ``quantize=True`` (VQ-VAE's and the official
#: Stage A's value; the reference spec does not list it).
COMMITMENT_BETA = 0.25


@dataclass(frozen=True, kw_only=True)
class StageAConfig:
    """Hyper-parameters of Stage A.

    Attributes:
        levels: Number of resolution levels; each level after the first halves the resolution (plus the fixed
            ×2 pixel-unshuffle of the input block).
        bottleneck_blocks: ResBlocks at the deepest level of the decoder.
        c_hidden: Channels at the deepest level; level ``i`` has ``c_hidden // 2**(levels-1-i)``.
        c_latent: Latent channels.
        codebook_size: Number of codebook vectors of the (unused by default) vector quantizer.
        scale_factor: Latents are divided by this in :meth:`StageA.encode` and multiplied in ``decode``.
    """

    levels: int
    bottleneck_blocks: int
    c_hidden: int
    c_latent: int
    codebook_size: int
    scale_factor: float

    def __post_init__(self) -> None:
        for name in ("levels", "bottleneck_blocks", "c_hidden", "c_latent", "codebook_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"StageAConfig.{name}={value!r}: must be a positive int")
        if self.c_hidden % 2 ** (self.levels - 1) != 0:
            raise ValueError(
                f"StageAConfig.c_hidden={self.c_hidden}: must be divisible by 2**(levels-1)={2 ** (self.levels - 1)}"
            )
        sf = self.scale_factor
        if isinstance(sf, bool) or not isinstance(sf, int | float) or not math.isfinite(sf) or sf <= 0:
            raise ValueError(f"StageAConfig.scale_factor={self.scale_factor!r}: must be a finite float > 0")

    @property
    def c_levels(self) -> list[int]:
        """Channels per level, shallowest first (released: ``[192, 384]``)."""
        return [self.c_hidden // 2 ** (self.levels - 1 - i) for i in range(self.levels)]


FLAVORS: dict[str, StageAConfig] = {
    "stage_a": StageAConfig(
        levels=2, bottleneck_blocks=12, c_hidden=384, c_latent=4, codebook_size=8192, scale_factor=0.43
    ),
    # Same key set as the released flavor (only the widths and the codebook shrink).
    "stage_a/tiny": StageAConfig(
        levels=2, bottleneck_blocks=12, c_hidden=32, c_latent=4, codebook_size=64, scale_factor=0.43
    ),
}


class ResBlockA(nn.Module):
    """Stage A's residual block: depthwise conv + channel MLP, each modulated by learnt scalars.

    With ``g = gammas``: ``x += dw(n1(x)·(1+g0)+g1)·g2`` then ``x += mlp(n2(x)·(1+g3)+g4)·g5``, where the norms
    are parameter-free LayerNorms over channels. ``gammas`` start at zero, so a fresh block is the identity.
    """

    def __init__(self, c: int, c_hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)
        self.depthwise = nn.Sequential(nn.ReplicationPad2d(1), nn.Conv2d(c, c, kernel_size=3, groups=c))
        self.norm2 = nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)
        self.channelwise = nn.Sequential(nn.Linear(c, c_hidden), nn.GELU(), nn.Linear(c_hidden, c))
        self.gammas = nn.Parameter(torch.zeros(6))

    @staticmethod
    def _norm_nchw(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
        return norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def forward(self, x_bchw: torch.Tensor) -> torch.Tensor:
        """Apply the block to an NCHW tensor."""
        g = self.gammas
        h = self._norm_nchw(self.norm1, x_bchw) * (1 + g[0]) + g[1]
        x_bchw = x_bchw + self.depthwise(h) * g[2]
        h = self.norm2(x_bchw.permute(0, 2, 3, 1)) * (1 + g[3]) + g[4]
        return x_bchw + self.channelwise(h).permute(0, 3, 1, 2) * g[5]


class VectorQuantizer(nn.Module):
    """Nearest-neighbour vector quantizer over the channel dim (VQ-VAE, van den Oord et al. 2017).

    Each latent pixel snaps to the codebook row with the smallest squared distance
    ``‖c‖² + ‖z‖² − 2·z·c`` (first index on ties). The quantized output has exactly the codebook values in the
    forward pass and straight-through gradients to the input (none to the codebook; the codebook learns through
    :meth:`loss`).
    """

    #: Latent pixels per distance block, bounding the ``rows × k`` distance matrix (4096 × 8192 float32 = 128 MiB).
    CHUNK_ROWS = 4096

    def __init__(self, c: int, k: int) -> None:
        super().__init__()
        self.codebook = nn.Embedding(k, c)

    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """Index of the nearest codebook row for each row of ``flat`` (``N×c``), as ``N`` int64."""
        with torch.no_grad():
            codes = self.codebook.weight.to(flat.dtype)
            codes_sqr = (codes * codes).sum(dim=1)
            out = []
            for rows in flat.split(self.CHUNK_ROWS):
                base = codes_sqr + (rows * rows).sum(dim=1, keepdim=True)
                out.append(torch.addmm(base, rows, codes.t(), beta=1.0, alpha=-2.0).argmin(dim=1))
            return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=flat.device)

    def forward(self, z_bchw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(quantized_bchw, indices_bhw)``; each latent pixel snaps to its nearest codebook row."""
        b, c, h, w = z_bchw.shape
        flat = z_bchw.permute(0, 2, 3, 1).reshape(-1, c)
        indices = self.nearest(flat)
        codes = self.codebook.weight.detach().to(z_bchw.dtype)
        quantized = codes[indices].reshape(b, h, w, c).permute(0, 3, 1, 2)
        # q + (z − z): exactly q in the forward pass, identity gradient to z (straight-through estimator).
        quantized = quantized + (z_bchw - z_bchw.detach())
        return quantized, indices.reshape(b, h, w)

    def loss(
        self, z_bchw: torch.Tensor, indices_bhw: torch.Tensor, beta: float = COMMITMENT_BETA
    ) -> torch.Tensor:
        """VQ-VAE loss ``‖sg[z] − e‖² + β·‖z − sg[e]‖²`` (means over all elements), e the chosen codebook rows.

        The first (codebook) term trains the codebook, the second (commitment) term the encoder.
        """
        codes = self.codebook.weight.to(z_bchw.dtype)[indices_bhw].permute(0, 3, 1, 2)
        codebook_loss = (codes - z_bchw.detach()).pow(2).mean()
        commitment_loss = (z_bchw - codes.detach()).pow(2).mean()
        return codebook_loss + beta * commitment_loss


class StageAEncoding(NamedTuple):
    """Result of ``StageA.encode(images, quantize=True)`` (the official ``encode(x, quantize=True)`` tuple).

    Attributes:
        latent: The *quantized* latent, scaled: ``quantized_raw / scale_factor``, ``B×c_latent×H/4×W/4``.
        raw: The *unquantized* latent, scaled: ``encode_unscaled(images) / scale_factor`` (the same tensor as
            ``encode(images)``). "raw" means "not quantized" here, not "unscaled".
        indices: Codebook index of each latent pixel, ``B×H/4×W/4`` int64.
        vq_loss: Scalar VQ loss ``codebook + β·commitment`` on the unscaled latent (see
            :meth:`VectorQuantizer.loss`).
    """

    latent: torch.Tensor
    raw: torch.Tensor
    indices: torch.Tensor
    vq_loss: torch.Tensor


class StageA(nn.Module):
    """Stage A VQGAN. Images are NCHW in [0, 1] (no normalisation); H and W must be multiples of 4."""

    def __init__(self, config: StageAConfig) -> None:
        super().__init__()
        self.config = config
        c_levels = config.c_levels
        self.in_block = nn.Sequential(nn.PixelUnshuffle(2), nn.Conv2d(3 * 4, c_levels[0], kernel_size=1))
        self.down_blocks = nn.Sequential(*self._encoder_blocks(config))
        self.vquantizer = VectorQuantizer(config.c_latent, config.codebook_size)
        self.up_blocks = nn.Sequential(*self._decoder_blocks(config))
        self.out_block = nn.Sequential(nn.Conv2d(c_levels[0], 3 * 4, kernel_size=1), nn.PixelShuffle(2))

    @staticmethod
    def _encoder_blocks(config: StageAConfig) -> list[nn.Module]:
        c_levels = config.c_levels
        blocks: list[nn.Module] = []
        for i, c in enumerate(c_levels):
            if i > 0:
                blocks.append(nn.Conv2d(c_levels[i - 1], c, kernel_size=4, stride=2, padding=1))
            blocks.append(ResBlockA(c, c * 4))
        to_latent = nn.Sequential(
            nn.Conv2d(c_levels[-1], config.c_latent, kernel_size=1, bias=False),
            nn.BatchNorm2d(config.c_latent),
        )
        return [*blocks, to_latent]

    @staticmethod
    def _decoder_blocks(config: StageAConfig) -> list[nn.Module]:
        c_levels = config.c_levels
        blocks: list[nn.Module] = [nn.Sequential(nn.Conv2d(config.c_latent, c_levels[-1], kernel_size=1))]
        for i in reversed(range(config.levels)):
            repeats = config.bottleneck_blocks if i == config.levels - 1 else 1
            blocks.extend(ResBlockA(c_levels[i], c_levels[i] * 4) for _ in range(repeats))
            if i > 0:
                blocks.append(
                    nn.ConvTranspose2d(c_levels[i], c_levels[i - 1], kernel_size=4, stride=2, padding=1)
                )
        return blocks

    def encode_unscaled(self, images_bchw: torch.Tensor) -> torch.Tensor:
        """Encode images in [0, 1] to the raw (unscaled, unquantized) latent ``B×c_latent×H/4×W/4``."""
        return self.down_blocks(self.in_block(images_bchw))

    def decode_unscaled(self, latents_raw_bchw: torch.Tensor) -> torch.Tensor:
        """Decode a raw latent (as from :meth:`encode_unscaled`) to images (not clamped)."""
        return self.out_block(self.up_blocks(latents_raw_bchw))

    @overload
    def encode(self, images_bchw: torch.Tensor, quantize: Literal[False] = False) -> torch.Tensor: ...

    @overload
    def encode(
        self, images_bchw: torch.Tensor, quantize: Literal[True], *, commitment_beta: float = ...
    ) -> StageAEncoding: ...

    @overload
    def encode(
        self, images_bchw: torch.Tensor, quantize: bool, *, commitment_beta: float = ...
    ) -> torch.Tensor | StageAEncoding: ...

    def encode(
        self, images_bchw: torch.Tensor, quantize: bool = False, *, commitment_beta: float = COMMITMENT_BETA
    ) -> torch.Tensor | StageAEncoding:
        """Encode images in [0, 1] to the scaled latent ``raw / scale_factor`` (Stage B's target space).

        With ``quantize=False`` (the default) this returns that tensor, i.e. the official
        ``encode(x, quantize=False)[0]``. With ``quantize=True`` it returns a :class:`StageAEncoding`
        ``(latent, raw, indices, vq_loss)``: the quantized latent / scale_factor, the unquantized latent /
        scale_factor, the codebook indices and the VQ loss, like the official ``encode(x, quantize=True)``.

        Args:
            images_bchw: Images in [0, 1], NCHW, H and W multiples of 4.
            quantize: Also snap the latent to the codebook.
            commitment_beta: Weight β of the commitment term of the VQ loss. The reference spec does not state it;
                0.25 (VQ-VAE's value, and the official Stage A's) is the default.
        """
        raw = self.encode_unscaled(images_bchw)
        scale = self.config.scale_factor
        if not quantize:
            return raw / scale
        quantized, indices = self.vquantizer(raw)
        vq_loss = self.vquantizer.loss(raw, indices, beta=commitment_beta)
        return StageAEncoding(latent=quantized / scale, raw=raw / scale, indices=indices, vq_loss=vq_loss)

    def decode(self, latents_bchw: torch.Tensor) -> torch.Tensor:
        """Decode a scaled latent (as from :meth:`encode`): multiply by ``scale_factor``, no quantization."""
        return self.decode_unscaled(latents_bchw * self.config.scale_factor)

    def quantize(self, latents_raw_bchw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Snap a raw latent to the codebook; returns ``(quantized_raw_bchw, indices_bhw)``."""
        return self.vquantizer(latents_raw_bchw)

    def forward(self, images_bchw: torch.Tensor) -> torch.Tensor:
        """Reconstruct images through the unquantized latent (official ``forward(x, quantize=False)[0]``)."""
        return self.decode(self.encode(images_bchw))
