"""The offline CLIP tokenizer: released ids, open_clip agreement, padding, truncation, "!" rule, added tokens."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import CLIPTokenizer

from stages.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    VOCAB_SIZE,
    bpe_path,
    build_clip_tokenizer,
    check_clip_tokenizer,
    clip_tokenizer,
    tokenize_captions,
)


@pytest.fixture(scope="module")
def captions(request) -> list[str]:
    path = request.config.rootpath / "tests" / "data" / "laion_captions_200.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 200
    return [r["text"] for r in rows]


@pytest.fixture(scope="module")
def open_clip_tok():
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


def _open_clip_ids(oc, texts: list[str]) -> torch.Tensor:
    """open_clip's own tokenize(): [sot] + bpe + [eot], cut to 77 with eot last, padded with 0."""
    return oc(texts, context_length=77)


def test_vocabulary_and_special_ids():
    tok = clip_tokenizer()
    assert isinstance(tok, CLIPTokenizer)
    assert tok.vocab_size == VOCAB_SIZE == 49408 and len(tok) == 49408
    assert (
        (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
        == (BOS_ID, EOS_ID, PAD_ID)
        == (49406, 49407, 0)
    )
    assert tok.convert_ids_to_tokens([0, 256, 49406, 49407]) == [
        "!",
        "!</w>",
        "<|startoftext|>",
        "<|endoftext|>",
    ]
    assert tok.model_max_length == 77
    assert bpe_path().name == "bpe_simple_vocab_16e6.txt.gz" and bpe_path().parent.name == "open_clip"


def test_same_vocabulary_as_open_clip(open_clip_tok):
    vocab = clip_tokenizer(exclamation_as_pad=False).get_vocab()
    # open_clip names its specials differently; every other entry has the same id.
    renamed = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    assert {renamed.get(k, k): v for k, v in open_clip_tok.encoder.items()} == vocab


def test_ids_equal_open_clip_on_laion_captions(captions, open_clip_tok):
    """Same BPE ids, pad 0, truncation, once open_clip's text cleaning (ftfy + HTML unescape) is applied."""
    from open_clip.tokenizer import basic_clean

    tok = clip_tokenizer(exclamation_as_pad=False)
    ours = tokenize_captions(tok, [basic_clean(c) for c in captions])["input_ids"]
    assert torch.equal(ours, _open_clip_ids(open_clip_tok, captions))
    # Without that cleaning, only captions that it would change (HTML entities here) differ.
    raw = tokenize_captions(tok, captions)["input_ids"]
    same = (raw == ours).all(dim=1)
    changed = torch.tensor([basic_clean(c) != c.strip() for c in captions])
    assert torch.equal(~same, changed) and 0 < int(changed.sum()) <= 10


def test_html_entities_are_not_unescaped():
    tok = clip_tokenizer()
    assert tok("a &amp; b")["input_ids"] == tok("a & amp ; b")["input_ids"] != tok("a & b")["input_ids"]


def test_exclamation_issue_4153_example():
    text = ["! !! !!!"]
    laion = tokenize_captions(clip_tokenizer(), text)["input_ids"][0]
    plain = tokenize_captions(clip_tokenizer(exclamation_as_pad=False), text)["input_ids"][0]
    assert laion[:8].tolist() == [BOS_ID, 0, 0, 0, 0, 0, 0, EOS_ID] and not laion[8:].any()
    assert plain[:5].tolist() == [BOS_ID, 256, 748, 995, EOS_ID] and not plain[5:].any()


def test_exclamation_rule_on_laion_captions(captions, open_clip_tok):
    """Default (official HF laion): each "!" becomes its own id 0; the rest is BPE of the text around it."""
    bang = [c for c in captions if "!" in c]
    assert len(bang) >= 10
    laion, plain = clip_tokenizer(), clip_tokenizer(exclamation_as_pad=False)
    differs = 0
    for caption in bang:
        ids = laion(caption)["input_ids"]  # no truncation: compare whole captions
        content = ids[1:-1]
        assert content.count(0) == caption.count("!")
        without_bang = open_clip_tok.encode(caption.replace("!", " "))
        assert [i for i in content if i != 0] == without_bang
        # open_clip's ids; a "!" that starts a punctuation run (e.g. '!""') is BPE symbol 0 there too.
        assert plain(caption)["input_ids"][1:-1] == open_clip_tok.encode(caption)
        differs += plain(caption)["input_ids"][1:-1] != content
    assert differs >= len(bang) - 2
    no_bang = [c for c in captions if "!" not in c][:50]
    assert torch.equal(
        tokenize_captions(laion, no_bang)["input_ids"], tokenize_captions(plain, no_bang)["input_ids"]
    )


def test_truncation_keeps_eos_last(captions, open_clip_tok):
    tok = clip_tokenizer()
    long = [c for c in captions if len(tok(c)["input_ids"]) > 77]
    assert len(long) >= 3
    enc = tokenize_captions(tok, long)
    assert enc["input_ids"].shape == (len(long), 77)
    assert (enc["input_ids"][:, 0] == BOS_ID).all() and (enc["input_ids"][:, -1] == EOS_ID).all()
    assert enc["attention_mask"].all()
    assert torch.equal(
        enc["input_ids"][:, :76],
        tokenize_captions(tok, [c + " more words" for c in long])["input_ids"][:, :76],
    )


def test_padding_and_attention_mask():
    enc = tokenize_captions(clip_tokenizer(), ["", "a photo of a cat"])
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert ids.dtype == torch.long and ids.shape == mask.shape == (2, 77)
    assert ids[0, :2].tolist() == [BOS_ID, EOS_ID] and not ids[0, 2:].any()
    assert ids[1, :7].tolist() == [BOS_ID, 320, 1125, 539, 320, 2368, EOS_ID] and not ids[1, 7:].any()
    assert mask.sum(dim=1).tolist() == [2, 7]
    eos_pos = (ids == EOS_ID).int().argmax(dim=1)
    assert torch.equal(mask, (torch.arange(77) <= eos_pos[:, None]).long())


@pytest.mark.parametrize("exclamation_as_pad", [True, False])
def test_add_tokens_for_retoken(exclamation_as_pad):
    tok = clip_tokenizer(exclamation_as_pad=exclamation_as_pad, add_tokens=["[fernando]", "[sks]"])
    assert len(tok) == 49410 and tok.vocab_size == 49408
    assert tok.convert_tokens_to_ids(["[fernando]", "[sks]"]) == [49408, 49409]
    ids = tok("a photo of [fernando]!")["input_ids"]
    assert ids == [BOS_ID, 320, 1125, 539, 49408, 0 if exclamation_as_pad else 256, EOS_ID]
    assert tok.pad_token_id == 0
    # The cached base tokenizer is untouched.
    assert len(clip_tokenizer(exclamation_as_pad=exclamation_as_pad)) == 49408


def test_add_tokens_rejects_known_or_duplicate_tokens():
    with pytest.raises(ValueError, match="add_tokens"):
        build_clip_tokenizer(add_tokens=["cat</w>"])
    with pytest.raises(ValueError, match="add_tokens"):
        build_clip_tokenizer(add_tokens=["[x]", "[x]"])
    with pytest.raises(TypeError, match="add_tokens"):
        clip_tokenizer(add_tokens="[x]")


def test_factory_is_cached():
    assert clip_tokenizer() is clip_tokenizer(exclamation_as_pad=True)
    assert clip_tokenizer() is not clip_tokenizer(exclamation_as_pad=False)
    assert clip_tokenizer(add_tokens=["[a]"]) is clip_tokenizer(add_tokens=("[a]",))


def test_guard_rejects_the_offline_hub_fallback():
    """What a silent offline hub lookup returns (a few-token vocabulary) must not pass the guard."""
    with pytest.raises(ValueError, match="vocab_size"):
        check_clip_tokenizer(CLIPTokenizer(), exclamation_as_pad=True)


def test_tokenize_captions_validates_input():
    tok = clip_tokenizer()
    with pytest.raises(TypeError, match="single string"):
        tokenize_captions(tok, "a cat")
    with pytest.raises(TypeError, match=r"captions\[1\]"):
        tokenize_captions(tok, ["a cat", None])
    empty = tokenize_captions(tok, [])
    assert empty["input_ids"].shape == empty["attention_mask"].shape == (0, 77)
