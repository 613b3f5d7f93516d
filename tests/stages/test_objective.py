"""Stage C's objective on cached tensors: official randomness, reproducible, and it trains."""

from __future__ import annotations

import torch

from stages.flavors import build_model
from stages.gdf import AdaptiveLossWeight, stage_gdf
from stages.objective import condition_batch, stage_c_loss


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
        losses.append(stage_c_loss(model, gdf, cache["latents"], _conditions(cache, gen), generator=gen).loss)
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
        out = stage_c_loss(model, gdf, cache["latents"], _conditions(cache, gen), generator=gen)
        optimizer.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        adaptive.update_buckets(out.logsnr, out.per_sample)
        history.append(out.per_sample.mean().item())
    assert sum(history[-10:]) / 10 < 0.8 * sum(history[:10]) / 10
