"""Reconstruction metrics per image: PSNR, SSIM (torchmetrics) and LPIPS (the ``lpips`` package).

LPIPS needs an ImageNet backbone (AlexNet, VGG16 or SqueezeNet 1.1 from torchvision) whose weights are not in
the ``lpips`` wheel (only its linear heads are). They are never downloaded: give ``backbone_weights``, a
safetensors file of the torchvision model's state dict (``features.*`` keys at least). Without it LPIPS is
reported as skipped, with the reason. ``random_backbone`` runs the real code path on a seeded random backbone
for tests; its values are meaningless and are labelled so.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

# lpips net name → torchvision constructor
LPIPS_BACKBONES = {"alex": "alexnet", "vgg": "vgg16", "squeeze": "squeezenet1_1"}
PSNR_CAP_DB = 100.0


@dataclass(frozen=True, kw_only=True)
class LpipsConfig:
    """The LPIPS backbone and where its weights are (a local or fsspec safetensors file)."""

    net: str = "alex"
    backbone_weights: str | None = None
    random_backbone: bool = False

    def __post_init__(self) -> None:
        if self.net not in LPIPS_BACKBONES:
            raise ValueError(f"net={self.net!r}; allowed: {', '.join(LPIPS_BACKBONES)}")
        if self.backbone_weights and self.random_backbone:
            raise ValueError("set backbone_weights or random_backbone, not both")

    @property
    def name(self) -> str:
        """The metric's full name: ``LPIPS v0.1 (alex)``, plus the backbone's origin."""
        origin = "random backbone: values meaningless" if self.random_backbone else "ImageNet backbone"
        return f"LPIPS v0.1 ({self.net}, {LPIPS_BACKBONES[self.net]}; {origin})"

    def skipped_reason(self) -> str | None:
        """Why LPIPS cannot run, or None when it can."""
        if self.backbone_weights or self.random_backbone:
            return None
        return (
            f"LPIPS skipped: no local weights for its {LPIPS_BACKBONES[self.net]} backbone "
            "(set lpips.backbone_weights to a safetensors file of torchvision's model; nothing is downloaded)"
        )


def build_lpips(config: LpipsConfig, storage_options: dict | None = None) -> torch.nn.Module:
    """The LPIPS module with its shipped linear heads and the configured backbone, in eval mode."""
    import lpips
    import torchvision

    from stages.weights import read_safetensors

    with (
        contextlib.redirect_stdout(io.StringIO()),
        torch.random.fork_rng(devices=[]),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore", UserWarning)  # torchvision's "pretrained is deprecated" inside lpips
        torch.manual_seed(0)
        model = lpips.LPIPS(net=config.net, pretrained=True, pnet_rand=True, verbose=False)
    if config.backbone_weights:
        backbone = getattr(torchvision.models, LPIPS_BACKBONES[config.net])(weights=None)
        state = read_safetensors(config.backbone_weights, storage_options).state_dict
        backbone.load_state_dict(state, strict=True)
        for index in range(1, model.net.N_slices + 1):
            for name, layer in getattr(model.net, f"slice{index}").named_children():
                layer.load_state_dict(backbone.features[int(name)].state_dict())
    return model.eval().requires_grad_(False)


class ImageMetrics:
    """PSNR (dB), SSIM and LPIPS of reconstructions against originals, per image, on [0, 1] float images."""

    def __init__(self, lpips: LpipsConfig, storage_options: dict | None = None) -> None:
        self.lpips_config = lpips
        self.lpips_skipped = lpips.skipped_reason()
        self.lpips = None if self.lpips_skipped else build_lpips(lpips, storage_options)

    @torch.no_grad()
    def __call__(self, original: torch.Tensor, recon: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B,3,H,W) pairs → ``{"psnr", "ssim", "lpips"}`` (B,) float32; LPIPS is NaN when skipped."""
        if original.shape != recon.shape:
            raise ValueError(f"original {tuple(original.shape)} and recon {tuple(recon.shape)} differ")
        original, recon = original.float(), recon.float()
        psnr = peak_signal_noise_ratio(recon, original, data_range=1.0, reduction="none", dim=(1, 2, 3))
        psnr = psnr.clamp(max=PSNR_CAP_DB)  # identical images: +inf, which JSON cannot hold
        ssim = structural_similarity_index_measure(recon, original, data_range=1.0, reduction="none")
        if self.lpips is None:
            lp = torch.full((original.size(0),), float("nan"))
        else:
            device = next(self.lpips.parameters()).device
            lp = self.lpips(recon.to(device) * 2 - 1, original.to(device) * 2 - 1).flatten().cpu()
        return {"psnr": psnr.reshape(-1), "ssim": ssim.reshape(-1), "lpips": lp}
