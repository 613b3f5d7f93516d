"""LoRA / ReToken for Stage C in the official format (spec §1.8)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, PreTrainedTokenizerFast

from stages.lora import (
    EMPTY_INDEX_DTYPE,
    LoRA,
    ReToken,
    add_train_tokens,
    apply_lora,
    build_lora,
    load_lora,
    merge_lora,
    save_lora,
    token_embedding,
)
from stages.stage_c import FLAVORS, StageC
from stages.weights import WeightsError

CLIP_VOCAB = 49408
DOG_IDS = {"dog</w>": 10, "dogs</w>": 11, "hotdog</w>": 12}


def _meta_stage_c(flavor: str) -> StageC:
    with torch.device("meta"):
        return StageC(FLAVORS[flavor])


@pytest.fixture
def tiny_c() -> StageC:
    torch.manual_seed(0)
    model = StageC(FLAVORS["stage_c/tiny"]).eval()
    nn.init.normal_(model.clf[1].weight, std=0.1)  # the official init zeroes the output conv
    return model


@pytest.fixture
def c_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "x": torch.randn(2, 16, 8, 8, generator=g),
        "r": torch.tensor([0.3, 0.7]),
        "clip_text": torch.randn(2, 77, 32, generator=g),
        "clip_text_pooled": torch.randn(2, 1, 32, generator=g),
        "clip_img": torch.randn(2, 1, 32, generator=g),
    }


@pytest.fixture
def text_model() -> CLIPTextModelWithProjection:
    torch.manual_seed(0)
    config = CLIPTextConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        projection_dim=32,
        vocab_size=CLIP_VOCAB,
        max_position_embeddings=77,
    )
    return CLIPTextModelWithProjection(config).eval()


@pytest.fixture
def tokenizer() -> PreTrainedTokenizerFast:
    """A real transformers tokenizer with a 49,408-entry word-level vocab (no network, no BPE files)."""
    vocab = {f"t{i}</w>": i for i in range(CLIP_VOCAB) if i not in DOG_IDS.values()}
    vocab.update(DOG_IDS)
    tk = Tokenizer(WordLevel(vocab, unk_token="t0</w>"))
    tk.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk)


def _perturb(lora: nn.ModuleDict, scale: float = 0.1) -> None:
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in lora["weights"]:
            layer.lora_down.copy_(torch.randn(layer.lora_down.shape, generator=g) * scale)


@torch.no_grad()
def _run(model: StageC, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**inputs)


def test_3_6b_counts_order_and_keys() -> None:
    model = _meta_stage_c("stage_c/3.6b")
    lora = build_lora(model, rank=4)
    weights = lora["weights"]
    assert list(lora.keys()) == ["embeddings", "weights"]
    assert lora["embeddings"].embeddings.shape == (0, 1280)  # c_clip_text of the 3.6B flavor
    assert len(weights) == 128
    assert sum(p.numel() for p in lora.parameters()) == 3_145_728
    assert weights[0].lora_up.shape == (2048, 4) and weights[0].lora_down.shape == (4, 2048)
    assert weights[1].lora_up.shape == (6144, 4) and weights[1].lora_down.shape == (4, 2048)
    assert all(weights[i].lora_up.shape[0] == (2048 if i % 2 == 0 else 6144) for i in range(128))
    # weights.0 belongs to the first AttnBlock's out_proj, weights.1 to its in_proj.
    first = model.down_blocks[0][2].attention.attn
    assert first.out_proj.parametrizations.weight[0] is weights[0]
    assert first.parametrizations.in_proj_weight[0] is weights[1]
    expected_keys = [f"weights.{i}.{n}" for i in range(128) for n in ("lora_down", "lora_up")]
    assert list(lora.state_dict()) == ["embeddings.embeddings", "embeddings.indices", *expected_keys]
    assert weights[0].alpha / weights[0].rank == 0.25
    # kv_mapper and conv blocks stay untouched.
    touched = {n for n, m in model.named_modules() if hasattr(m, "parametrizations")}
    assert all(n.endswith(".attention.attn") or n.endswith(".attention.attn.out_proj") for n in touched)
    assert len(touched) == 128


def test_1b_counts() -> None:
    lora = build_lora(_meta_stage_c("stage_c/1b"), rank=4)
    assert len(lora["weights"]) == 64
    assert sum(p.numel() for p in lora.parameters()) == 32 * 4 * (1536 * 2 + 1536 * 4) == 1_179_648
    assert lora["weights"][0].lora_up.shape == (1536, 4)
    assert lora["weights"][1].lora_up.shape == (4608, 4)


def test_lora_parametrization_math() -> None:
    layer = nn.Linear(6, 5)
    lora = LoRA(layer, rank=3, alpha=2.0)
    assert torch.count_nonzero(lora.lora_down) == 0
    with torch.no_grad():
        lora.lora_down.normal_()
    w = layer.weight.detach()
    expected = w + (lora.lora_up @ lora.lora_down) * (2.0 / 3)
    torch.testing.assert_close(lora(w), expected)


@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("which", [0, 1])
def test_mha_uses_both_parametrised_weights(which: int, frozen: bool) -> None:
    """nn.MultiheadAttention (slow path and no-grad fast path) reads the LoRA'd out_proj and in_proj."""
    attn = nn.MultiheadAttention(16, 2, batch_first=True).eval().requires_grad_(not frozen)
    q, kv = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    with torch.no_grad():
        before = attn(q, kv, kv, need_weights=False)[0]
    layers = apply_lora(attn, filters=("",), rank=2)
    assert [type(m).__name__ for m in layers] == ["LoRA", "LoRA"]
    assert layers[0].lora_up.shape == (16, 2) and layers[1].lora_up.shape == (48, 2)
    with torch.no_grad():
        layers[which].lora_down.normal_()
        after = attn(q, kv, kv, need_weights=False)[0]
        in_w, out_w = attn.in_proj_weight.clone(), attn.out_proj.weight.clone()
    assert (after - before).abs().max() > 1e-3
    merge_lora(attn)
    assert torch.equal(attn.in_proj_weight.detach(), in_w) and torch.equal(
        attn.out_proj.weight.detach(), out_w
    )
    with torch.no_grad():
        torch.testing.assert_close(attn(q, kv, kv, need_weights=False)[0], after, atol=1e-5, rtol=0)


def test_apply_lora_rejects_bad_filters(tiny_c: StageC) -> None:
    with pytest.raises(ValueError, match="matched no weight"):
        apply_lora(tiny_c, filters=("no_such_module",))
    with pytest.raises(TypeError, match="sequence of substrings"):
        apply_lora(tiny_c, filters=".attn")


def test_zero_init_delta_and_merge(tiny_c: StageC, c_inputs: dict[str, torch.Tensor]) -> None:
    tiny_c.requires_grad_(False)  # frozen generator, as in LoRA training; keeps MHA on one kernel path
    before = _run(tiny_c, c_inputs)
    assert before.abs().max() > 1e-3
    plain_keys = list(tiny_c.state_dict())
    lora = build_lora(tiny_c, rank=4)
    assert torch.equal(_run(tiny_c, c_inputs), before)
    assert any("parametrizations" in k for k in tiny_c.state_dict())

    _perturb(lora)
    parametrised = _run(tiny_c, c_inputs)
    assert (parametrised - before).abs().max() > 1e-3

    # Gradients reach the LoRA factors through nn.MultiheadAttention.
    tiny_c(**c_inputs).square().mean().backward()
    assert all(
        layer.lora_up.grad is not None and layer.lora_up.grad.abs().sum() > 0 for layer in lora["weights"]
    )

    merged = merge_lora(tiny_c)
    assert merged is tiny_c
    assert list(tiny_c.state_dict()) == plain_keys
    torch.testing.assert_close(_run(tiny_c, c_inputs), parametrised, atol=1e-5, rtol=0)

    fresh = StageC(FLAVORS["stage_c/tiny"]).eval()
    fresh.load_state_dict(tiny_c.state_dict(), strict=True)
    torch.testing.assert_close(_run(fresh, c_inputs), parametrised, atol=1e-5, rtol=0)


def test_save_load_round_trip(tmp_path, tiny_c: StageC, c_inputs: dict[str, torch.Tensor]) -> None:
    base_state = {k: v.clone() for k, v in tiny_c.state_dict().items()}
    lora = build_lora(tiny_c, rank=4)
    _perturb(lora)
    expected = _run(tiny_c, c_inputs)
    path = tmp_path / "lora.safetensors"
    digest = save_lora(lora, path)
    assert len(digest) == 64
    assert set(load_file(str(path))) == set(lora.state_dict())  # safetensors sorts keys

    torch.manual_seed(123)  # the new LoRA starts from different random lora_up values
    other = StageC(FLAVORS["stage_c/tiny"]).eval()
    other.load_state_dict(base_state, strict=True)
    lora2 = build_lora(other, rank=4)
    assert not torch.equal(lora2["weights"][0].lora_up, lora["weights"][0].lora_up)
    assert load_lora(lora2, path) == digest
    for key, value in lora.state_dict().items():
        assert torch.equal(lora2.state_dict()[key], value), key
    assert torch.equal(_run(other, c_inputs), expected)


def test_load_rejects_wrong_rank_and_missing_keys(tmp_path, tiny_c: StageC) -> None:
    rank8 = tmp_path / "rank8.safetensors"
    save_lora(build_lora(StageC(FLAVORS["stage_c/tiny"]), rank=8), rank8)
    lora = build_lora(tiny_c, rank=4)
    with pytest.raises(WeightsError) as info:
        load_lora(lora, rank8)
    message = str(info.value)
    assert str(rank8) in message and "weights.0.lora_down" in message and "wrong shapes" in message

    partial = tmp_path / "partial.safetensors"
    state = {k: v.clone() for k, v in lora.state_dict().items() if k != "weights.1.lora_up"}
    save_file(state, str(partial))
    with pytest.raises(WeightsError, match=r"partial\.safetensors.*missing keys: weights\.1\.lora_up"):
        load_lora(lora, partial)


def test_retoken_changes_only_selected_rows(text_model: CLIPTextModelWithProjection) -> None:
    ids = torch.tensor([[49406, 5, 10, 300, 49407]])
    before = text_model(input_ids=ids).text_embeds
    original = token_embedding(text_model).weight.detach().clone()
    plain_keys = list(text_model.state_dict())
    lora = build_lora(StageC(FLAVORS["stage_c/tiny"]), text_model, rank=4, retoken_indices=[10, 300])
    assert list(lora.keys()) == ["embeddings", "weights"]
    retoken = lora["embeddings"]
    assert isinstance(retoken, ReToken) and retoken.embeddings.shape == (2, 32)
    assert list(lora.state_dict())[:2] == ["embeddings.embeddings", "embeddings.indices"]
    assert "text_model.embeddings.token_embedding.parametrizations.weight.original" in text_model.state_dict()
    assert torch.equal(text_model(input_ids=ids).text_embeds, before)

    with torch.no_grad():
        retoken.embeddings.copy_(torch.randn(2, 32))
    weight = token_embedding(text_model).weight.detach()
    changed = (weight != original).any(dim=1).nonzero().flatten().tolist()
    assert changed == [10, 300]
    torch.testing.assert_close(weight[[10, 300]], original[[10, 300]] + retoken.embeddings.detach())
    after = text_model(input_ids=ids).text_embeds
    assert (after - before).abs().max() > 1e-4

    merge_lora(text_model)
    assert list(text_model.state_dict()) == plain_keys
    torch.testing.assert_close(text_model(input_ids=ids).text_embeds, after)


def test_build_lora_needs_text_model_and_indices_together(text_model: CLIPTextModelWithProjection) -> None:
    with pytest.raises(ValueError, match="together"):
        build_lora(StageC(FLAVORS["stage_c/tiny"]), text_model)


def test_add_train_tokens_new_token(tokenizer, text_model: CLIPTextModelWithProjection) -> None:
    weight = token_embedding(text_model).weight.detach().clone()
    indices = add_train_tokens(tokenizer, text_model, [["[fernando]", "^dog</w>"]])
    assert indices == [CLIP_VOCAB]
    assert tokenizer.get_vocab()["[fernando]"] == CLIP_VOCAB
    assert tokenizer("a [fernando] dog</w>")["input_ids"][1] == CLIP_VOCAB
    emb = token_embedding(text_model)
    assert emb.weight.shape == (CLIP_VOCAB + 1, 32) and emb.num_embeddings == CLIP_VOCAB + 1
    assert text_model.config.vocab_size == CLIP_VOCAB + 1
    torch.testing.assert_close(emb.weight[CLIP_VOCAB].detach(), weight[10])  # only "dog</w>" matches
    assert torch.equal(emb.weight[:CLIP_VOCAB].detach(), weight)

    # A regex matching several entries averages them; one matching none gives zeros.
    indices = add_train_tokens(tokenizer, text_model, [["<wuff>", "dog"], ["[nothing]", "^zzz$"]])
    assert indices == [CLIP_VOCAB + 1, CLIP_VOCAB + 2]
    torch.testing.assert_close(emb.weight[CLIP_VOCAB + 1].detach(), weight[[10, 11, 12]].mean(0))
    assert torch.count_nonzero(emb.weight[CLIP_VOCAB + 2]) == 0

    lora = build_lora(StageC(FLAVORS["stage_c/tiny"]), text_model, retoken_indices=[CLIP_VOCAB])
    assert lora["embeddings"].indices.tolist() == [CLIP_VOCAB]
    out = text_model(input_ids=torch.tensor([[49406, CLIP_VOCAB, 49407]])).text_embeds
    assert out.shape == (1, 32)


def test_add_train_tokens_existing_and_errors(tokenizer, text_model: CLIPTextModelWithProjection) -> None:
    assert add_train_tokens(tokenizer, text_model, [["^dogs?</w>$"]]) == [10, 11]
    assert token_embedding(text_model).num_embeddings == CLIP_VOCAB
    with pytest.raises(ValueError, match="matches no vocabulary entry"):
        add_train_tokens(tokenizer, text_model, [["^zzz$"]])
    with pytest.raises(ValueError, match="already in the vocabulary"):
        add_train_tokens(tokenizer, text_model, [["[x]"], ["[x]"]])


def test_add_train_tokens_real_clip_tokenizer(text_model: CLIPTextModelWithProjection) -> None:
    """The official entry on the real CLIP BPE vocabulary: new id 49408, initialised from "dog</w>"."""
    tokenizer_module = pytest.importorskip("stages.tokenizer")
    tokenizer = tokenizer_module.build_clip_tokenizer()
    dog = tokenizer.get_vocab()["dog</w>"]
    weight = token_embedding(text_model).weight.detach().clone()
    assert add_train_tokens(tokenizer, text_model, [["^dog</w>"]]) == [dog]
    assert add_train_tokens(tokenizer, text_model, [["[fernando]", "^dog</w>"]]) == [CLIP_VOCAB]
    torch.testing.assert_close(token_embedding(text_model).weight[CLIP_VOCAB].detach(), weight[dog])
    assert CLIP_VOCAB in tokenizer("a photo of [fernando]")["input_ids"]


class _Wrapper(nn.Module):
    """A conditioner-like wrapper: no get_input_embeddings, a frozen config of its own."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = _FrozenConfig(vocab_size=CLIP_VOCAB)


@dataclass(frozen=True)
class _FrozenConfig:
    vocab_size: int


def test_add_train_tokens_through_wrapper(tokenizer, text_model: CLIPTextModelWithProjection) -> None:
    wrapper = _Wrapper(text_model)
    assert token_embedding(wrapper) is text_model.get_input_embeddings()
    with pytest.warns(UserWarning, match="read-only"):
        assert add_train_tokens(tokenizer, wrapper, [["[fernando]", "^dog</w>"]]) == [CLIP_VOCAB]
    assert text_model.config.vocab_size == CLIP_VOCAB + 1
    retoken = build_lora(StageC(FLAVORS["stage_c/tiny"]), wrapper, retoken_indices=[CLIP_VOCAB])["embeddings"]
    assert retoken.embeddings.shape == (1, 32)
    merge_lora(wrapper)
    assert "model.text_model.embeddings.token_embedding.weight" in wrapper.state_dict()


def test_official_file_layout_loads(tmp_path, text_model: CLIPTextModelWithProjection, tokenizer) -> None:
    """A file written with the official key names (independently of save_lora) loads into build_lora."""
    model = StageC(FLAVORS["stage_c/tiny"])
    indices = add_train_tokens(tokenizer, text_model, [["[fernando]", "^dog</w>"]])
    lora = build_lora(model, text_model, rank=4, retoken_indices=indices)
    n_layers = len(lora["weights"])
    state = {"embeddings.embeddings": torch.ones(1, 32), "embeddings.indices": torch.tensor([CLIP_VOCAB])}
    for i in range(n_layers):
        out = 64 if i % 2 == 0 else 192
        state[f"weights.{i}.lora_down"] = torch.full((4, 64), 0.01)
        state[f"weights.{i}.lora_up"] = torch.ones(out, 4)
    path = tmp_path / "official.safetensors"
    save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state.items()}, str(path))
    load_lora(lora, path)
    assert lora["embeddings"].embeddings.dtype == torch.float32
    assert torch.equal(lora["weights"][1].lora_up, torch.ones(192, 4))
    assert set(load_file(str(path))) == set(lora.state_dict())


# --- the official `lora` layout with no trained tokens (issue 14) -------------------------------------------------


class _SpecReToken(nn.Module):
    """The official ReToken as spec §1.8 describes it: an (N, 1280) Parameter and ``torch.tensor(indices)``."""

    def __init__(self, indices: list[int], dim: int = 1280) -> None:
        super().__init__()
        self.embeddings = nn.Parameter(torch.zeros(len(indices), dim))
        self.register_buffer("indices", torch.tensor(indices))


class _SpecLoRA(nn.Module):
    def __init__(self, out_features: int, in_features: int, rank: int) -> None:
        super().__init__()
        self.lora_down = nn.Parameter(torch.zeros(rank, in_features))
        self.lora_up = nn.Parameter(torch.randn(out_features, rank))


def _spec_bundle(
    shapes: list[tuple[int, int]], rank: int, indices: list[int] | None = None, dim: int = 1280
) -> nn.ModuleDict:
    """``ModuleDict{'embeddings': ReToken, 'weights': ModuleList[LoRA]}`` from (out, in) per LoRA layer."""
    weights = nn.ModuleList([_SpecLoRA(o, i, rank) for o, i in shapes])
    return nn.ModuleDict({"embeddings": _SpecReToken(indices or [], dim), "weights": weights})


# Tiny Stage C (c=64, '.attn'): 6 AttnBlocks x (out_proj (64, 64), in_proj (192, 64)).
TINY_SHAPES = [(64, 64), (192, 64)] * 6


def test_spec_bundle_matches_tiny_stage_c() -> None:
    lora = build_lora(StageC(FLAVORS["stage_c/tiny"]), rank=4)
    assert [(w.lora_up.shape[0], w.lora_down.shape[1]) for w in lora["weights"]] == TINY_SHAPES


def test_empty_retoken_matches_official_dtype() -> None:
    """``train_tokens: []`` officially gives ``torch.tensor([])``: float32, shape (0,)."""
    official = _SpecReToken([])
    assert official.indices.dtype == torch.float32 and official.indices.shape == (0,)
    assert official.indices.dtype == EMPTY_INDEX_DTYPE
    ours = ReToken([], 1280)
    assert ours.indices.dtype == official.indices.dtype and ours.indices.shape == (0,)
    assert ours.embeddings.shape == (0, 1280)
    weight = torch.randn(5, 1280)
    assert torch.equal(ours(weight), weight)  # the identity, even if registered
    assert ReToken(torch.tensor([3, 1], dtype=torch.int32), 4).indices.dtype == torch.int64
    with pytest.raises(TypeError, match="integer token ids"):
        ReToken([1.5], 4)


def test_state_dict_strict_round_trip_with_official_layout(tmp_path) -> None:
    """Our saved key set/shapes and the official module load into each other with strict=True."""
    torch.manual_seed(0)
    lora = build_lora(StageC(FLAVORS["stage_c/tiny"]), rank=4, text_dim=1280)
    _perturb(lora)
    state = lora.state_dict()
    assert list(state)[:2] == ["embeddings.embeddings", "embeddings.indices"]
    assert state["embeddings.embeddings"].shape == (0, 1280)
    assert state["embeddings.indices"].shape == (0,) and state["embeddings.indices"].dtype == torch.float32

    # ours -> file -> official (strict)
    path = tmp_path / "lora.safetensors"
    save_lora(lora, path)
    written = load_file(str(path))
    official = _spec_bundle(TINY_SHAPES, rank=4)
    assert set(written) == set(official.state_dict())
    assert written["embeddings.indices"].dtype == official.state_dict()["embeddings.indices"].dtype
    official.load_state_dict(written, strict=True)
    assert torch.equal(official["weights"][2].lora_down, lora["weights"][2].lora_down)

    # official (in memory) -> ours (strict), both directions of plain load_state_dict
    other = build_lora(StageC(FLAVORS["stage_c/tiny"]), rank=4, text_dim=1280)
    other.load_state_dict(official.state_dict(), strict=True)
    official.load_state_dict(other.state_dict(), strict=True)
    for key, value in lora.state_dict().items():
        assert torch.equal(other.state_dict()[key], value), key


def test_save_lora_dtype_keeps_empty_indices_float32(tmp_path) -> None:
    lora = build_lora(StageC(FLAVORS["stage_c/tiny"]), rank=4)
    path = tmp_path / "bf16.safetensors"
    save_lora(lora, path, dtype=torch.bfloat16)
    written = load_file(str(path))
    assert written["embeddings.indices"].dtype == torch.float32
    assert written["embeddings.embeddings"].dtype == torch.bfloat16 and written[
        "embeddings.embeddings"
    ].shape == (0, 32)
    assert written["weights.0.lora_up"].dtype == torch.bfloat16
    load_lora(lora, path)


@pytest.mark.parametrize("index_dtype", [torch.float32, torch.int64])
def test_official_file_with_empty_embeddings_loads(tmp_path, index_dtype: torch.dtype) -> None:
    """An official-layout file with no trained tokens (float32 indices as written, or int64) loads into ours."""
    official = _spec_bundle(TINY_SHAPES, rank=4)
    with torch.no_grad():
        for layer in official["weights"]:
            layer.lora_down.normal_()
    state = {k: v.clone() for k, v in official.state_dict().items()}
    state["embeddings.indices"] = state["embeddings.indices"].to(index_dtype)
    path = tmp_path / "official.safetensors"
    save_file({k: v.to(torch.bfloat16) if v.is_floating_point() and k != "embeddings.indices" else v
               for k, v in state.items()}, str(path))  # fmt: skip
    lora = build_lora(StageC(FLAVORS["stage_c/tiny"]), rank=4, text_dim=1280)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. no "indices differ" warning
        load_lora(lora, path)
    assert lora["embeddings"].indices.dtype == torch.float32 and lora["embeddings"].indices.numel() == 0
    expected = official["weights"][3].lora_down.to(torch.bfloat16).float()
    assert torch.equal(lora["weights"][3].lora_down, expected)


def test_empty_bundle_with_text_model(text_model: CLIPTextModelWithProjection) -> None:
    """``train_tokens: []`` with a text model: an empty ReToken of its width, the text model untouched."""
    keys = list(text_model.state_dict())
    lora = build_lora(StageC(FLAVORS["stage_c/tiny"]), text_model, rank=4, retoken_indices=[])
    assert lora["embeddings"].embeddings.shape == (0, 32)
    assert list(text_model.state_dict()) == keys
    with pytest.raises(ValueError, match="text_dim=1280 differs"):
        build_lora(StageC(FLAVORS["stage_c/tiny"]), text_model, retoken_indices=[], text_dim=1280)


def test_text_dim_defaults() -> None:
    class _Attn(nn.Module):  # no Stage C config: the official 1280
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2)

    assert build_lora(nn.Sequential(_Attn()))["embeddings"].embeddings.shape == (0, 1280)
    assert build_lora(StageC(FLAVORS["stage_c/tiny"]))["embeddings"].embeddings.shape == (
        0,
        32,
    )  # c_clip_text
    assert build_lora(StageC(FLAVORS["stage_c/tiny"]), text_dim=7)["embeddings"].embeddings.shape == (0, 7)
    with pytest.raises(ValueError, match="positive integer"):
        build_lora(StageC(FLAVORS["stage_c/tiny"]), text_dim=0)


def test_official_file_with_tokens_needs_a_text_model(tmp_path, text_model, tokenizer) -> None:
    official = _spec_bundle(TINY_SHAPES, rank=4, indices=[CLIP_VOCAB], dim=32)
    assert official.state_dict()["embeddings.indices"].dtype == torch.int64
    path = tmp_path / "tokens.safetensors"
    save_file(official.state_dict(), str(path))
    with pytest.raises(WeightsError, match=r"trains 1 token.*retoken_indices"):
        load_lora(build_lora(StageC(FLAVORS["stage_c/tiny"]), rank=4), path)
    indices = add_train_tokens(tokenizer, text_model, [["[fernando]", "^dog</w>"]])
    lora = build_lora(StageC(FLAVORS["stage_c/tiny"]), text_model, rank=4, retoken_indices=indices)
    load_lora(lora, path)
    official.load_state_dict(lora.state_dict(), strict=True)

    float_ids = tmp_path / "float_ids.safetensors"
    save_file(
        {**official.state_dict(), "embeddings.indices": torch.tensor([float(CLIP_VOCAB)])}, str(float_ids)
    )
    with pytest.raises(WeightsError, match="integer token ids"):
        load_lora(lora, float_ids)


def test_legacy_file_without_embeddings_loads_with_warning(tmp_path) -> None:
    lora = build_lora(StageC(FLAVORS["stage_c/tiny"]), rank=4)
    _perturb(lora)
    legacy = tmp_path / "legacy.safetensors"
    save_file({k: v for k, v in lora.state_dict().items() if k.startswith("weights.")}, str(legacy))
    other = build_lora(StageC(FLAVORS["stage_c/tiny"]), rank=4)
    with pytest.warns(UserWarning, match="written before"):
        load_lora(other, legacy)
    assert torch.equal(other["weights"][0].lora_down, lora["weights"][0].lora_down)
    half = tmp_path / "half.safetensors"
    save_file({k: v for k, v in lora.state_dict().items() if k != "embeddings.indices"}, str(half))
    with pytest.raises(WeightsError, match=r"missing keys: embeddings\.indices"):
        load_lora(other, half)


def test_train_loop_usage(tiny_c: StageC, c_inputs: dict[str, torch.Tensor]) -> None:
    """As jobs/train_loop.py: AdamW on the bundle's requires_grad params, optimizer state named by the generator."""
    tiny_c.requires_grad_(False)
    lora = build_lora(tiny_c, filters=(".attn",), rank=4)
    params = [p for p in lora.parameters() if p.requires_grad]
    assert len(params) == 2 * len(lora["weights"])  # the unattached empty ReToken is not trained
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    tiny_c(**c_inputs).square().mean().backward()
    optimizer.step()
    state = get_optimizer_state_dict(tiny_c, optimizer, options=StateDictOptions(full_state_dict=True))
    assert len(state["state"]) == len(params)
    assert {"embeddings.embeddings", "embeddings.indices"} <= set(lora.state_dict())
