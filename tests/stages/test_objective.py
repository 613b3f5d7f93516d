"""The training objectives on cached tensors (Stage C, Stage B): official randomness, reproducible, and they train."""

from __future__ import annotations

import numpy as np
import torch

from stages.flavors import build_model
from stages.gdf import AdaptiveLossWeight, stage_gdf
from stages.objective import condition_batch, diffusion_loss


def _cache(b: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "latents": torch.randn(b, 16, 6, 6, generator=gen),
        "clip_text": torch.randn(b, 77, 32, generator=gen),
        "clip_text_pooled": torch.randn(b, 1, 32, generator=gen),
        "clip_img": torch.randn(b, 32, generator=gen),
        "empty_text": torch.randn(77, 32, generator=gen),
        "empty_pooled": torch.randn(32, generator=gen),
    }


def _conditions(cache, gen, **kw):
    return condition_batch(cache["clip_text"], cache["clip_text_pooled"], cache["clip_img"], cache["empty_text"],
                           cache["empty_pooled"], generator=gen, **kw)  # fmt: skip


def test_caption_dropout_and_image_use_rates() -> None:
    cache = _cache(b=4000)
    cond = _conditions(cache, torch.Generator().manual_seed(1))
    dropped = (cond["clip_text"] == cache["empty_text"]).all(dim=(1, 2))
    used_img = cond["clip_img"].abs().sum(dim=(1, 2)) > 0
    assert 0.04 < dropped.float().mean() < 0.06 and 0.085 < used_img.float().mean() < 0.115
    assert torch.equal(
        cond["clip_text_pooled"][dropped, 0], cache["empty_pooled"].expand(int(dropped.sum()), -1)
    )
    kept = ~dropped
    assert torch.equal(cond["clip_text"][kept], cache["clip_text"][kept])
    assert torch.equal(cond["clip_img"][used_img, 0], cache["clip_img"][used_img])
    assert cond["clip_img"].shape == (4000, 1, 32) and cond["clip_text_pooled"].shape == (4000, 1, 32)


def test_step_is_reproducible_under_a_seed() -> None:
    model, _ = build_model("stage_c/tiny")
    gdf, cache = stage_gdf(), _cache()
    losses = []
    for _ in range(2):
        gen = torch.Generator().manual_seed(7)
        losses.append(
            diffusion_loss(model, gdf, cache["latents"], _conditions(cache, gen), generator=gen).loss
        )
    assert torch.equal(losses[0], losses[1])


def test_tiny_stage_c_learns_on_cached_tensors() -> None:
    torch.manual_seed(0)
    model, _ = build_model("stage_c/tiny")
    model.train()
    gdf, cache = stage_gdf(adaptive=True), _cache(b=4)
    adaptive = gdf.loss_weight
    assert isinstance(adaptive, AdaptiveLossWeight)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(3)
    history = []
    for _ in range(60):
        out = diffusion_loss(model, gdf, cache["latents"], _conditions(cache, gen), generator=gen)
        optimizer.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        adaptive.update_buckets(out.logsnr, out.per_sample)
        history.append(out.per_sample.mean().item())
    assert sum(history[-10:]) / 10 < 0.8 * sum(history[:10]) / 10


def test_stage_b_draws_one_official_size_per_micro_batch_uniformly() -> None:
    from stages.objective import stage_b_cells

    gen = torch.Generator().manual_seed(0)
    draws = [stage_b_cells(32, range(16, 32), generator=gen) for _ in range(16000)]
    counts = np.bincount(draws, minlength=32)[16:]
    # ⌊32·U(0.5, 1)⌋: 16 sizes, 1/16 each
    assert counts.sum() == 16000 and np.abs(counts / 1000 - 1).max() < 0.1
    # the official factor: ⌊1024·f/32⌋·32 px for f ~ U(0.5, 1) is what the draw reproduces
    f = 0.5 + 0.5 * torch.rand((), generator=torch.Generator().manual_seed(7)).item()
    assert stage_b_cells(32, range(16, 32), generator=torch.Generator().manual_seed(7)) == int(1024 * f // 32)
    subset = {stage_b_cells(32, (16, 24, 31), generator=gen) for _ in range(200)}
    assert subset == {16, 24, 31}  # nearest stored size
    assert stage_b_cells(32, (16, 24, 31), generator=torch.Generator().manual_seed(7)) == min(
        (16, 24, 31), key=lambda s: (abs(s - int(32 * f)), s)
    )


def test_stage_b_conditions_drop_captions_and_effnet_at_the_official_rates() -> None:
    from stages.objective import stage_b_conditions, stage_b_noise

    b, gen = 20000, torch.Generator().manual_seed(1)
    pooled, empty = torch.ones(b, 1, 8), torch.full((8,), -1.0)
    stored = {2: torch.ones(b, 16, 2, 2), 3: torch.ones(b, 16, 3, 3)}
    out = stage_b_conditions(pooled, empty, stored, 4, generator=gen)
    assert out["clip"].shape == (b, 1, 8) and out["effnet"].shape[-1] in (2, 3)
    dropped = (out["clip"][:, 0, 0] == -1).float().mean().item()
    zeros = (out["effnet"].flatten(1).abs().sum(1) == 0).float().mean().item()
    assert abs(dropped - 0.05) < 0.01 and abs(zeros - 0.10) < 0.01
    noise = stage_b_noise(torch.zeros(64, 4, 64, 64), generator=gen)
    assert abs(noise.std().item() - 1) < 0.02  # pyramid noise renormalised to unit variance
