"""CLIP text/image conditioners: official output definitions, masking, preprocessing, flavors, local loading."""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from stages.conditioners import (
    CLIP_MEAN,
    CLIP_STD,
    FLAVORS,
    TEXT_FLAVORS,
    VISION_FLAVORS,
    ClipTextConditioner,
    ClipTextConfig,
    ClipVisionConditioner,
    ClipVisionConfig,
)
from stages.tokenizer import EOS_ID, clip_tokenizer, tokenize_captions

CAPTIONS = ["a photo of a cat", "", "Stable Cascade encodes a 768 px image to 16x24x24 latents!"]


def _n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def text() -> ClipTextConditioner:
    torch.manual_seed(0)
    return ClipTextConditioner.from_flavor("clip_text/tiny")


@pytest.fixture(scope="module")
def vision() -> ClipVisionConditioner:
    torch.manual_seed(0)
    return ClipVisionConditioner.from_flavor("clip_vision/tiny")


def _photo(name: str) -> torch.Tensor:
    import skimage.data

    rgb = getattr(skimage.data, name)()
    return torch.from_numpy(rgb).permute(2, 0, 1).float().div(255)


# --- flavors -------------------------------------------------------------------------------------------------


def test_flavor_tables():
    assert set(TEXT_FLAVORS) == {"clip_text/bigg", "clip_text/tiny"}
    assert set(VISION_FLAVORS) == {"clip_vision/l14", "clip_vision/tiny"}
    assert FLAVORS == {**TEXT_FLAVORS, **VISION_FLAVORS}


def test_released_parameter_counts_on_meta():
    with torch.device("meta"):
        bigg = ClipTextConditioner.from_flavor("clip_text/bigg")
        l14 = ClipVisionConditioner.from_flavor("clip_vision/l14")
    assert _n_params(bigg) == 694_659_840  # CLIP ViT-bigG-14 text tower + 1280×1280 projection
    assert _n_params(l14) == 303_966_208  # OpenAI CLIP ViT-L/14 vision tower + 1024×768 projection
    assert bigg.model.config.eos_token_id == 2  # legacy argmax pooling, as in the released config


def test_tiny_flavors_are_small(text, vision):
    assert _n_params(text) == 1_601_696  # dominated by the real 49408-token embedding
    assert _n_params(vision) < 1_000_000
    assert (text.config.hidden_size, text.config.projection_dim) == (32, 32)


@pytest.mark.parametrize("name", sorted(FLAVORS))
def test_configs_round_trip_through_transformers(name):
    config = FLAVORS[name]
    assert type(config).from_hf(config.to_hf()) == config


def test_config_validation_names_the_field():
    base = FLAVORS["clip_text/tiny"]
    with pytest.raises(ValueError, match="hidden_size=33"):
        dataclasses.replace(base, hidden_size=33)
    with pytest.raises(ValueError, match="hidden_act"):
        dataclasses.replace(base, hidden_act="relu")
    with pytest.raises(ValueError, match="patch_size_px"):
        dataclasses.replace(FLAVORS["clip_vision/tiny"], patch_size_px=30)
    with pytest.raises(ValueError, match="allowed"):
        ClipTextConditioner.from_flavor("clip_vision/tiny")
    with pytest.raises(TypeError):
        ClipTextConfig(hidden_size=32)  # keyword-only with required fields


# --- text ----------------------------------------------------------------------------------------------------


def test_text_shapes_and_frozen_eval(text):
    out = text(CAPTIONS)
    assert out.clip_text.shape == (3, 77, 32) and out.clip_text_pooled.shape == (3, 1, 32)
    assert out.clip_text.dtype == out.clip_text_pooled.dtype == torch.float32
    assert torch.isfinite(out.clip_text).all()
    text.train()
    assert not text.training and not text.model.training
    assert not any(p.requires_grad for p in text.parameters())


def test_clip_text_is_last_layer_before_final_layer_norm(text):
    tokens = text.tokenize(CAPTIONS)
    out = text.encode(tokens["input_ids"], tokens["attention_mask"])
    ref = text.model(**tokens, output_hidden_states=True)
    assert len(ref.hidden_states) == text.config.num_hidden_layers + 1
    assert torch.equal(out.clip_text, ref.hidden_states[-1])
    assert not torch.allclose(out.clip_text, ref.last_hidden_state, atol=1e-2)
    final_ln = text.model.text_model.final_layer_norm
    torch.testing.assert_close(final_ln(out.clip_text), ref.last_hidden_state)


def test_pooled_is_projection_of_eos_state(text):
    tokens = text.tokenize(CAPTIONS)
    out = text.encode(tokens["input_ids"], tokens["attention_mask"])
    eos_pos = (tokens["input_ids"] == EOS_ID).int().argmax(dim=1)
    normed = text.model.text_model.final_layer_norm(out.clip_text)
    expected = text.model.text_projection(normed[torch.arange(3), eos_pos])
    torch.testing.assert_close(out.clip_text_pooled[:, 0], expected)


def test_padding_cannot_reach_tokens_up_to_eos(text):
    """Causal attention: what follows eos (pad id, mask) changes nothing at or before eos, pooled included."""
    tokens = text.tokenize(CAPTIONS)
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    base = text.encode(ids, mask)
    eos_pad = text.encode(torch.where(mask.bool(), ids, torch.full_like(ids, EOS_ID)), mask)
    unmasked = text.encode(ids, torch.ones_like(mask))
    keep = mask.bool()
    for other in (eos_pad, unmasked):
        torch.testing.assert_close(other.clip_text[keep], base.clip_text[keep], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(other.clip_text_pooled, base.clip_text_pooled, rtol=1e-5, atol=1e-5)
    # ... but the stored padding positions do depend on both, so the mask must be passed exactly as officially.
    assert not torch.allclose(eos_pad.clip_text[~keep], base.clip_text[~keep], atol=1e-3)
    assert not torch.allclose(unmasked.clip_text[~keep], base.clip_text[~keep], atol=1e-3)


def test_text_is_deterministic():
    torch.manual_seed(123)
    a = ClipTextConditioner.from_flavor("clip_text/tiny")
    torch.manual_seed(123)
    b = ClipTextConditioner.from_flavor("clip_text/tiny")
    out_a, out_b = a(CAPTIONS), b(CAPTIONS)
    assert torch.equal(out_a.clip_text, out_b.clip_text)
    assert torch.equal(a(CAPTIONS).clip_text_pooled, out_a.clip_text_pooled)
    # A sample's conditions do not depend on the rest of the batch.
    torch.testing.assert_close(a(CAPTIONS[:1]).clip_text, out_a.clip_text[:1])


def test_exclamation_option_reaches_the_encoder(text):
    other = ClipTextConditioner(
        text.config, model=text.model, tokenizer=clip_tokenizer(exclamation_as_pad=False)
    )
    caption = ["wow!"]
    assert (
        text.tokenize(caption)["input_ids"][0, 2] == 0 and other.tokenize(caption)["input_ids"][0, 2] == 256
    )
    assert not torch.allclose(text(caption).clip_text_pooled, other(caption).clip_text_pooled)


@pytest.mark.parametrize("legacy", [True, False])
def test_pooling_position_with_retoken_ids(legacy):
    """Legacy (released config): pooled at argmax id, i.e. an added token ≥ 49408; otherwise at the first eos."""
    config = dataclasses.replace(FLAVORS["clip_text/tiny"], vocab_size=49409, legacy_argmax_pooling=legacy)
    cond = ClipTextConditioner(config, tokenizer=clip_tokenizer(add_tokens=["[fernando]"]))
    tokens = cond.tokenize(["a photo of [fernando] in a garden"])
    ids = tokens["input_ids"][0]
    assert ids[4] == 49408
    out = cond.encode(tokens["input_ids"], tokens["attention_mask"])
    pos = 4 if legacy else int((ids == EOS_ID).nonzero()[0])
    normed = cond.model.text_model.final_layer_norm(out.clip_text[0, pos])
    torch.testing.assert_close(out.clip_text_pooled[0, 0], cond.model.text_projection(normed))


def test_ids_beyond_vocabulary_are_refused(text):
    bigger = clip_tokenizer(add_tokens=["[x]"])
    with pytest.raises(ValueError, match="vocab_size=49408"):
        ClipTextConditioner(text.config, tokenizer=bigger)
    tokens = tokenize_captions(bigger, ["[x]"])
    with pytest.raises(ValueError, match="resize_token_embeddings"):
        text.encode(tokens["input_ids"], tokens["attention_mask"])
    with pytest.raises(ValueError, match="must both be"):
        text.encode(tokens["input_ids"][0], tokens["attention_mask"][0])


def test_bf16_autocast_keeps_float32_outputs(text):
    fast = ClipTextConditioner(text.config, model=text.model, autocast_dtype=torch.bfloat16)
    out, ref = fast(CAPTIONS), text(CAPTIONS)
    assert out.clip_text.dtype == torch.float32
    torch.testing.assert_close(out.clip_text, ref.clip_text, rtol=0.05, atol=0.05)


# --- local weights -------------------------------------------------------------------------------------------


def test_load_pretrained_from_local_folder(text, vision, tmp_path):
    text.model.save_pretrained(tmp_path / "text")
    vision.model.save_pretrained(tmp_path / "vision")
    text2 = ClipTextConditioner.load_pretrained(tmp_path / "text")
    vision2 = ClipVisionConditioner.load_pretrained(tmp_path / "vision")
    assert text2.config == text.config and vision2.config == vision.config
    assert not text2.training and not any(p.requires_grad for p in text2.parameters())
    assert torch.equal(text2(CAPTIONS).clip_text, text(CAPTIONS).clip_text)
    image = _photo("chelsea")
    assert torch.equal(vision2([image]), vision([image]))
    with pytest.raises(ValueError, match="do not fit"):
        ClipTextConditioner.load_pretrained(tmp_path / "vision")


def test_from_local_dir_checks_flavor_and_hashes_weights(text, tmp_path):
    text.model.save_pretrained(tmp_path)
    loaded = ClipTextConditioner.from_local_dir(FLAVORS["clip_text/tiny"], tmp_path)
    assert loaded.weights_sha256 == hashlib.sha256((tmp_path / "model.safetensors").read_bytes()).hexdigest()
    assert text.weights_sha256 is None
    with pytest.raises(ValueError, match="hidden_size=32"):
        ClipTextConditioner.from_local_dir(FLAVORS["clip_text/bigg"], tmp_path)


def test_sharded_folder_loads_and_hashes_every_shard(text, tmp_path):
    text.model.save_pretrained(tmp_path, max_shard_size="2MB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) == 2
    loaded = ClipTextConditioner.load_pretrained(tmp_path)
    lines = "".join(f"{f.name} {hashlib.sha256(f.read_bytes()).hexdigest()}\n" for f in shards)
    assert loaded.weights_sha256 == hashlib.sha256(lines.encode()).hexdigest()
    assert torch.equal(loaded(CAPTIONS).clip_text_pooled, text(CAPTIONS).clip_text_pooled)


def test_pickled_weights_are_refused(text, tmp_path):
    text.model.config.save_pretrained(tmp_path)
    torch.save(text.model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="safetensors"):
        ClipTextConditioner.load_pretrained(tmp_path)


@pytest.mark.parametrize(
    "path", ["laion/CLIP-ViT-bigG-14-laion2B-39B-b160k", "s3://bucket/clip", "hf://laion/x", "/no/such/dir"]
)
def test_load_pretrained_refuses_non_local_paths(path):
    with pytest.raises(ValueError, match="local"):
        ClipTextConditioner.load_pretrained(path)


def test_load_pretrained_needs_config_json(tmp_path):
    with pytest.raises(ValueError, match=r"config\.json"):
        ClipVisionConditioner.load_pretrained(tmp_path)


# --- vision --------------------------------------------------------------------------------------------------


def _pil_reference(image: torch.Tensor, size: int) -> torch.Tensor:
    """CLIP's original preprocessing with PIL: bicubic short-side resize, center crop, in [0, 1]."""
    _, h, w = image.shape
    scale = size / min(h, w)
    new_w, new_h = (size, int(w * scale)) if w < h else (int(w * scale), size)
    rgb = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    resized = Image.fromarray(rgb).resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = round((new_w - size) / 2), round((new_h - size) / 2)
    crop = np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.float32) / 255
    return torch.from_numpy(crop).permute(2, 0, 1)


def _unnormalize(x: torch.Tensor) -> torch.Tensor:
    return x * torch.tensor(CLIP_STD).view(1, 3, 1, 1) + torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)


@pytest.mark.parametrize("name", ["astronaut", "chelsea"])
def test_preprocess_matches_clip_reference_on_real_photos(vision, name):
    image = _photo(name)  # astronaut 512×512, chelsea 300×451 (landscape: crop the long side)
    pixels = vision.preprocess(image[None])
    assert pixels.shape == (1, 3, 224, 224) and pixels.dtype == torch.float32
    restored = _unnormalize(pixels)[0]
    ref = _pil_reference(image, 224)
    assert (restored - ref).abs().mean() < 0.01
    # Normalisation: channel statistics of the restored pixels follow the picture, not the CLIP constants.
    torch.testing.assert_close(restored.mean(dim=(1, 2)), ref.mean(dim=(1, 2)), atol=0.01, rtol=0)


def test_antialias_is_closer_to_pil_than_no_antialias(vision):
    image = _photo("astronaut")  # 512 → 224 downscale: aliasing matters
    ref = _pil_reference(image, 224)
    aliased = ClipVisionConditioner(dataclasses.replace(vision.config, antialias=False), model=vision.model)
    err_aa = (_unnormalize(vision.preprocess(image[None]))[0] - ref).abs().mean()
    err_no = (_unnormalize(aliased.preprocess(image[None]))[0] - ref).abs().mean()
    assert err_aa < err_no
    assert vision.config.preprocess_spec()["antialias"] is True
    assert aliased.config.preprocess_spec() != vision.config.preprocess_spec()


def test_image_embeds_shapes_and_batching(vision):
    photos = [_photo("astronaut"), _photo("chelsea")]
    embeds = vision(photos)
    assert embeds.shape == (2, vision.config.projection_dim) and embeds.dtype == torch.float32
    assert vision.clip_img(photos).shape == (2, 1, vision.config.projection_dim)
    torch.testing.assert_close(vision(photos[1][None]), embeds[1:])
    assert not torch.allclose(embeds[0], embeds[1])
    vision.train()
    assert not vision.model.training


def test_preprocess_rejects_wrong_inputs(vision):
    with pytest.raises(TypeError, match="float"):
        vision.preprocess(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        vision.preprocess(torch.full((1, 3, 32, 32), 255.0))
    with pytest.raises(ValueError, match="B, 3, H, W"):
        vision.preprocess(torch.zeros(3, 32, 32))


def test_vision_config_is_a_vision_config():
    assert isinstance(FLAVORS["clip_vision/l14"], ClipVisionConfig)
    assert FLAVORS["clip_vision/l14"].preprocess_spec()["resize_short_side_px"] == 224


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_autocast_matches_cpu(text, vision):
    gpu_text = ClipTextConditioner(text.config, model=text.model, autocast_dtype=torch.bfloat16).to("cuda")
    gpu_vision = ClipVisionConditioner(vision.config, model=vision.model, autocast_dtype=torch.bfloat16).to(
        "cuda"
    )
    out = gpu_text(CAPTIONS)
    assert out.clip_text.device.type == "cuda" and out.clip_text.dtype == torch.float32
    ref = ClipTextConditioner(text.config, model=gpu_text.model.to("cpu"))(CAPTIONS)
    torch.testing.assert_close(out.clip_text.cpu(), ref.clip_text, rtol=0.05, atol=0.05)
    gpu_vision.to("cuda")
    embeds = gpu_vision([_photo("chelsea").cuda()])
    assert embeds.device.type == "cuda" and embeds.shape == (1, vision.config.projection_dim)
