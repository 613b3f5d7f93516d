"""CUDA paths: device placement, bf16 weights and bf16 autocast. Run on a GPU machine with `-m gpu`."""

from __future__ import annotations

import pytest
import torch

from stages import sampling
from stages.flavors import build_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("name", ["stage_c/tiny", "stage_b/tiny"])
def test_bf16_autocast_matches_fp32(name: str) -> None:
    model, _ = build_model(name, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, device="cuda") * 0.02)
    r = torch.rand(2, device="cuda")
    if name == "stage_c/tiny":
        args = (torch.randn(2, 16, 24, 24, device="cuda"), r, torch.randn(2, 77, 32, device="cuda"),
                torch.randn(2, 1, 32, device="cuda"), torch.randn(2, 1, 32, device="cuda"))  # fmt: skip
    else:
        args = (torch.randn(2, 4, 64, 64, device="cuda"), r, torch.randn(2, 16, 12, 12, device="cuda"),
                torch.randn(2, 1, 32, device="cuda"))  # fmt: skip
    with torch.no_grad():
        reference = model(*args)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            mixed = model(*args)
    assert mixed.dtype == torch.bfloat16
    assert torch.allclose(mixed.float(), reference, atol=5e-2, rtol=5e-2)


def test_bf16_weights_and_sampling_on_cuda() -> None:
    models = sampling.CascadeModels(
        stage_c=build_model("stage_c/tiny", device="cuda")[0],
        stage_b=build_model("stage_b/tiny", device="cuda")[0],
        stage_a=build_model("stage_a/tiny", device="cuda")[0],
        effnet=build_model("effnet/tiny", device="cuda")[0],
        text=build_model("clip_text/tiny", device="cuda")[0],
    )
    fast_c = sampling.SamplerSettings(timesteps=2, cfg=4.0, shift=2.0)
    fast_b = sampling.SamplerSettings(timesteps=2, cfg=1.1, shift=1.0)
    kw = {"height": 128, "width": 128, "stage_c": fast_c, "stage_b": fast_b, "seed": 3}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        a = sampling.text_to_image(models, ["a cat"], **kw)
        b = sampling.text_to_image(models, ["a cat"], **kw)
    assert a.device.type == "cuda" and a.shape == (1, 3, 128, 128) and torch.equal(a, b)
    half, _ = build_model("stage_c/tiny", device="cuda", dtype=torch.bfloat16)
    assert next(half.parameters()).dtype == torch.bfloat16
