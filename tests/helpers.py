"""Small helpers shared by tests."""

from __future__ import annotations

import torch


def randomize_(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Give every parameter and BatchNorm statistic a seeded non-default value, so tests can fail.

    The official inits zero some output layers; comparisons on such models would pass vacuously.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return randomize_bn_(model, seed + 1)


def randomize_bn_(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Non-default BatchNorm statistics, so a round trip that dropped buffers would show."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(torch.randn(buf.shape, generator=gen) * 0.1)
            elif name.endswith("running_var"):
                buf.copy_(torch.rand(buf.shape, generator=gen) + 0.5)
    return model
