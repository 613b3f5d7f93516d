"""Scorers: the real LAION aesthetic head, one-pass CLIP scoring, official preprocessing, HF equivalence."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import CLIPVisionModelWithProjection

from stages.conditioners import VISION_FLAVORS, ClipVisionConditioner
from stages.scorers import (
    FLAVORS,
    AestheticHead,
    ClipScorer,
    ClipScorerConfig,
    load_aesthetic_head,
    open_clip_vision_to_hf,
    read_local_state_dict,
)
from stages.weights import WeightsError

AESTHETIC = Path(__file__).resolve().parents[1] / "data" / "aesthetic" / "sac+logos+ava1-l14-linearMSE.pth"
AESTHETIC_SHA256 = "21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0"
TINY = FLAVORS["clip_score/tiny"]
CAPTIONS = ["an astronaut in a white suit", "a tabby cat", ""]


def _photo(name: str) -> torch.Tensor:
    import skimage.data

    return torch.from_numpy(getattr(skimage.data, name)()).permute(2, 0, 1).float().div(255)


@pytest.fixture(scope="module")
def photos() -> list[torch.Tensor]:
    return [_photo("astronaut"), _photo("chelsea"), _photo("coffee")]  # 512², 300×451, 400×600


@pytest.fixture(scope="module")
def scorer() -> ClipScorer:
    """Tiny scorer with every weight perturbed (unit LayerNorms and zero biases would hide mapping errors)."""
    model = ClipScorer(TINY, seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.clip.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


# --- aesthetic head ------------------------------------------------------------------------------------------


def test_real_aesthetic_head_keys_and_shapes():
    head, sha = load_aesthetic_head(AESTHETIC)
    assert sha == AESTHETIC_SHA256
    raw = torch.load(AESTHETIC, map_location="cpu", weights_only=True)
    shapes = {k: tuple(v.shape) for k, v in raw.items()}
    assert shapes == {
        "layers.0.weight": (1024, 768), "layers.0.bias": (1024,), "layers.2.weight": (128, 1024),
        "layers.2.bias": (128,), "layers.4.weight": (64, 128), "layers.4.bias": (64,),
        "layers.6.weight": (16, 64), "layers.6.bias": (16,), "layers.7.weight": (1, 16), "layers.7.bias": (1,),
    }  # fmt: skip
    assert {k: tuple(v.shape) for k, v in head.state_dict().items()} == shapes
    assert all(torch.equal(head.state_dict()[k], v) for k, v in raw.items())
    assert head.input_dim == 768 and not head.training
    assert not any(p.requires_grad for p in head.parameters())


def test_real_aesthetic_score_equals_hand_computation():
    head, _ = load_aesthetic_head(AESTHETIC)
    raw = torch.load(AESTHETIC, map_location="cpu", weights_only=True)
    x = F.normalize(torch.randn(4, 768, generator=torch.Generator().manual_seed(123)), dim=-1)
    hand = x.double()
    for i in (0, 2, 4, 6, 7):  # dropout is off at inference and upstream has no activations
        hand = hand @ raw[f"layers.{i}.weight"].double().T + raw[f"layers.{i}.bias"].double()
    got = head(x)
    assert got.shape == (4, 1)
    torch.testing.assert_close(got.double(), hand, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(got).all() and len(set(got.flatten().tolist())) == 4


def test_aesthetic_head_from_safetensors(tmp_path):
    head, _ = load_aesthetic_head(AESTHETIC)
    save_file(head.state_dict(), tmp_path / "head.safetensors")
    again, sha = load_aesthetic_head(tmp_path / "head.safetensors")
    x = F.normalize(torch.randn(2, 768), dim=-1)
    assert torch.equal(again(x), head(x)) and sha != AESTHETIC_SHA256


def test_aesthetic_head_is_strict(tmp_path):
    state = AestheticHead(32).state_dict()
    state["layers.1.weight"] = torch.zeros(3)  # an unexpected key
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(WeightsError, match=r"unexpected keys: layers\.1\.weight"):
        load_aesthetic_head(tmp_path / "bad.pth")


class _NotATensor:
    pass


def test_pickles_with_objects_are_refused(tmp_path):
    torch.save({"layers.0.weight": _NotATensor()}, tmp_path / "evil.pth")
    with pytest.raises(WeightsError, match="weights_only=True"):
        read_local_state_dict(tmp_path / "evil.pth")


# --- flavors and config --------------------------------------------------------------------------------------


def test_flavors_match_the_transformers_vision_flavors():
    assert set(FLAVORS) == {"clip_score/l14", "clip_score/tiny"}
    assert all(isinstance(c, ClipScorerConfig) for c in FLAVORS.values())
    l14 = FLAVORS["clip_score/l14"]
    assert l14.embed_dim == 768 and l14.vision.hidden_act == "quick_gelu"
    assert l14.vision == VISION_FLAVORS["clip_vision/l14"]  # the Stage C clip_img flavor
    assert TINY.vision == VISION_FLAVORS["clip_vision/tiny"]


def test_l14_parameter_counts_on_meta():
    with torch.device("meta"):
        l14 = ClipScorer(FLAVORS["clip_score/l14"])
    assert sum(p.numel() for p in l14.clip.parameters()) == 427_616_513  # open_clip ViT-L-14 (openai)
    assert sum(p.numel() for p in l14.clip.visual.parameters()) == 303_966_208  # = HF CLIP-L vision tower
    assert l14.aesthetic.input_dim == 768
    assert (l14.clip.context_length, l14.clip.vocab_size) == (77, 49408)


@pytest.mark.parametrize(
    ("change", "match"),
    [({"text_heads": 3}, "text_width=32"), ({"text_layers": 0}, "text_layers=0"),
     ({"text_mlp_ratio": -1.0}, "text_mlp_ratio"),
     ({"vision": dataclasses.replace(VISION_FLAVORS["clip_vision/tiny"], layer_norm_eps=1e-6)}, "layer_norm_eps")],
)  # fmt: skip
def test_config_validation(change, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(TINY, **change)
    with pytest.raises(TypeError, match="ClipScorerConfig"):
        ClipScorer(VISION_FLAVORS["clip_vision/tiny"])  # type: ignore[arg-type]


# --- scoring -------------------------------------------------------------------------------------------------


def test_tiny_scorer_on_real_photos(scorer, photos):
    out = scorer.score(photos, CAPTIONS)
    assert [tuple(t.shape) for t in out] == [(3, 32), (3, 32), (3,), (3,)]
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in out)
    torch.testing.assert_close(out.image_embeds_normalized.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(out.image_embeds_normalized, F.normalize(out.image_embeds, dim=-1))
    assert ((out.clip_similarity >= -1) & (out.clip_similarity <= 1)).all()
    assert out.image_embeds.norm(dim=-1).sub(1).abs().max() > 1e-2  # stored unnormalised
    # Same numbers again, and from a fresh scorer with the same seed and perturbation.
    assert all(torch.equal(a, b) for a, b in zip(out, scorer.score(photos, CAPTIONS), strict=True))
    again = ClipScorer(TINY, seed=0)
    again.load_state_dict(scorer.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(out, again.score(photos, CAPTIONS), strict=True))
    # Each image is scored independently of its batch, and the aesthetic score is the head on the embedding.
    single = scorer.score([photos[1]], [CAPTIONS[1]])
    torch.testing.assert_close(single.image_embeds[0], out.image_embeds[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scorer.aesthetic(out.image_embeds_normalized).squeeze(-1), out.aesthetic)


def test_similarity_is_the_cosine_with_the_caption(scorer, photos):
    out = scorer.score(photos, CAPTIONS)
    tokens = scorer.tokenize(CAPTIONS)
    assert tokens.shape == (3, 77) and tokens[2, :3].tolist() == [49406, 49407, 0]  # empty caption: sot, eot
    text = F.normalize(scorer.clip.encode_text(tokens), dim=-1)
    torch.testing.assert_close(out.clip_similarity, (out.image_embeds_normalized * text).sum(-1))
    swapped = scorer.score(photos, [CAPTIONS[1], CAPTIONS[0], "a cup of coffee"])
    assert not torch.allclose(swapped.clip_similarity, out.clip_similarity)
    torch.testing.assert_close(swapped.image_embeds, out.image_embeds)


def test_one_image_pass_per_call(scorer, photos):
    calls = {"visual": [], "text": 0}
    h1 = scorer.clip.visual.register_forward_hook(lambda m, a, o: calls["visual"].append(a[0].shape[0]))
    h2 = scorer.clip.transformer.register_forward_hook(
        lambda m, a, o: calls.__setitem__("text", calls["text"] + 1)
    )
    try:
        scorer.score(photos, CAPTIONS)
    finally:
        h1.remove()
        h2.remove()
    assert calls == {"visual": [3], "text": 1}


def test_scoring_opens_no_socket(monkeypatch, photos):
    import socket

    from stages import scorers

    attempts: list[object] = []
    monkeypatch.setattr(socket.socket, "connect", lambda self, address, *a: attempts.append(address))
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: attempts.append(a) or [])
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    scorers._tokenizer.cache_clear()  # rebuild open_clip's tokenizer from its bundled BPE
    out = ClipScorer(TINY).score(photos[:1], ["a photo of an astronaut"])
    assert attempts == [] and torch.isfinite(out.clip_similarity).all()


def test_batch_tensor_input_and_errors(scorer, photos):
    batch = torch.stack([F.interpolate(p[None], size=(256, 320), mode="bilinear")[0] for p in photos])
    out = scorer(batch.clamp(0, 1), CAPTIONS)
    assert out.aesthetic.shape == (3,)
    with pytest.raises(ValueError, match="3 images but 2 captions"):
        scorer.score(batch, CAPTIONS[:2])
    with pytest.raises(TypeError, match="sequence of str"):
        scorer.score(batch[:1], "a cat")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        scorer.score(batch * 255, CAPTIONS)


def test_frozen_eval_and_autocast(scorer, photos):
    scorer.train()
    assert not scorer.training and not scorer.aesthetic.training
    assert not any(p.requires_grad for p in scorer.parameters())
    bf16 = ClipScorer(TINY, autocast_dtype=torch.bfloat16)
    bf16.load_state_dict(scorer.state_dict())
    ref, mixed = scorer.score(photos, CAPTIONS), bf16.score(photos, CAPTIONS)
    assert mixed.image_embeds.dtype == torch.float32
    torch.testing.assert_close(mixed.image_embeds_normalized, ref.image_embeds_normalized, atol=5e-2, rtol=0)


# --- official preprocessing and equality with transformers (Stage C's clip_img) ------------------------------


def test_preprocessing_is_the_official_one(scorer, photos):
    official = ClipVisionConditioner(VISION_FLAVORS["clip_vision/tiny"])
    assert torch.equal(scorer.preprocess(photos), official.preprocess(photos))
    assert scorer.config.vision.preprocess_spec() == official.config.preprocess_spec()


def test_image_embeds_equal_transformers_clip_img(scorer, photos):
    hf_state = open_clip_vision_to_hf(scorer.clip.state_dict())  # a full CLIP state dict: visual.* is taken
    hf = CLIPVisionModelWithProjection(TINY.vision.to_hf())
    hf.load_state_dict(hf_state, strict=True)
    conditioner = ClipVisionConditioner(TINY.vision, model=hf)
    out = scorer.score(photos, CAPTIONS)
    clip_img = conditioner.clip_img(photos)
    assert clip_img.shape == (3, 1, 32)
    torch.testing.assert_close(out.image_embeds, clip_img[:, 0], atol=1e-5, rtol=1e-5)
    assert out.image_embeds.abs().max() > 0.1  # a real comparison, not of near-zero vectors


def test_converter_covers_the_l14_tower_on_meta():
    with torch.device("meta"):
        l14 = ClipScorer(FLAVORS["clip_score/l14"])
        hf = CLIPVisionModelWithProjection(FLAVORS["clip_score/l14"].vision.to_hf())
    converted = open_clip_vision_to_hf(l14.clip.visual.state_dict())
    assert {k: tuple(v.shape) for k, v in converted.items()} == {
        k: tuple(v.shape) for k, v in hf.state_dict().items()
    }
    with pytest.raises(ValueError, match="unsupported key"):
        open_clip_vision_to_hf({"attn_pool.query": torch.zeros(1)})


# --- loading from local files only ---------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_load_round_trip(scorer, photos, tmp_path, suffix):
    path = tmp_path / f"open_clip_pytorch_model{suffix}"
    state = {k: v.contiguous() for k, v in scorer.clip.state_dict().items()}
    save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    head = tmp_path / "head.safetensors"
    save_file(scorer.aesthetic.state_dict(), head)
    loaded = ClipScorer.load(TINY, clip_weights=path, aesthetic_weights=head)
    assert loaded.clip_sha256 and len(loaded.clip_sha256) == 64 and loaded.aesthetic_sha256
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert all(t.device.type == "cpu" for t in [*loaded.parameters(), *loaded.buffers()])
    ref = scorer.score(photos, CAPTIONS)
    assert all(torch.equal(a, b) for a, b in zip(ref, loaded.score(photos, CAPTIONS), strict=True))


@pytest.mark.parametrize(
    "name",
    ["ViT-L-14", "openai", "hf-hub:timm/vit_large_patch14_clip_224.openai", "https://example.com/model.bin",
     "s3://bucket/open_clip_pytorch_model.safetensors", "/nonexistent/open_clip_pytorch_model.bin"],
)  # fmt: skip
def test_refuses_hub_names_and_urls(name):
    with pytest.raises(ValueError, match="local file"):
        ClipScorer.load(FLAVORS["clip_score/l14"], clip_weights=name, aesthetic_weights=AESTHETIC)


def test_load_rejects_mismatched_weights(scorer, tmp_path):
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in scorer.clip.state_dict().items()}, path)
    with pytest.raises(ValueError, match=r"head input 768 != config\.embed_dim=32"):
        ClipScorer.load(TINY, clip_weights=path, aesthetic_weights=AESTHETIC)
    wider = dataclasses.replace(TINY, vision=dataclasses.replace(TINY.vision, num_hidden_layers=3))
    head = tmp_path / "head.safetensors"
    save_file(scorer.aesthetic.state_dict(), head)
    with pytest.raises(WeightsError, match=r"missing keys: visual\.transformer\.resblocks\.2"):
        ClipScorer.load(wider, clip_weights=path, aesthetic_weights=head)
