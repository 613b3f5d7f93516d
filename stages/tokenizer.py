"""Offline CLIP BPE tokenizer with the ids of Stable Cascade's text tokenizer.

Stable Cascade tokenises captions with ``AutoTokenizer('laion/CLIP-ViT-bigG-14-laion2B-39B-b160k')`` (the
``tokenizers``-backed ``CLIPTokenizer``) using ``padding="max_length", max_length=77, truncation=True`` and passes
the attention mask to the text model (spec §3, "One Stage C step"). Nothing may be downloaded here, and a hub
lookup with ``HF_HUB_OFFLINE=1`` silently yields a 2-token vocabulary, so the same tokenizer is rebuilt from the
BPE merges that ``open_clip`` ships (``bpe_simple_vocab_16e6.txt.gz``) and checked against known ids.

Conventions reproduced from the laion bigG tokenizer config:

- Specials: ``<|startoftext|>`` = 49406 (bos), ``<|endoftext|>`` = 49407 (eos); vocabulary 49408 entries.
- Padding uses id **0** (the token ``"!"``), like open_clip, not 49407 like the OpenAI CLIP tokenizers.
- That config registers ``"!"`` as a *special* pad token, so a literal ``"!"`` in a caption is split out and
  becomes id 0, where open_clip's BPE gives 256 (``"!</w>"``) or a merge such as ``"!!</w>"``
  (diffusers issue 4153). ``exclamation_as_pad=True`` (default) reproduces this, i.e. the official code path;
  ``False`` keeps the pad id 0 but encodes ``"!"`` with the ordinary BPE, as open_clip does.

Text cleaning is the HF fast tokenizer's (NFC, collapse whitespace, lowercase); unlike open_clip it applies no
``ftfy`` fix and no HTML unescaping, so ``"&amp;"`` stays five characters.
"""

from __future__ import annotations

import gzip
import importlib.util
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import torch
from transformers import AddedToken, CLIPTokenizer

__all__ = [
    "BOS_ID",
    "CONTEXT_LENGTH",
    "EOS_ID",
    "KNOWN_IDS",
    "PAD_ID",
    "VOCAB_SIZE",
    "bpe_path",
    "build_clip_tokenizer",
    "check_clip_tokenizer",
    "clip_tokenizer",
    "clip_vocab_and_merges",
    "tokenize_captions",
]

VOCAB_SIZE = 49408
BOS_ID = 49406
EOS_ID = 49407
PAD_ID = 0
CONTEXT_LENGTH = 77
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "!"
# 256 byte symbols + 256 end-of-word byte symbols + merges + 2 specials = 49408.
_N_MERGES = VOCAB_SIZE - 2 * 256 - 2
# Ids that the released CLIP vocabulary gives (also open_clip's SimpleTokenizer); a wrong build cannot match them.
KNOWN_IDS: dict[str, list[int]] = {
    "a photo of a cat": [320, 1125, 539, 320, 2368],
    "hello world": [3306, 1002],
}


def bpe_path() -> Path:
    """Path of ``bpe_simple_vocab_16e6.txt.gz`` inside the installed ``open_clip`` package (no import, no I/O)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("open_clip (package open_clip_torch) is needed for the CLIP BPE vocabulary")
    path = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise FileNotFoundError(f"CLIP BPE vocabulary not found at {path}")
    return path


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins for raw bytes, in vocabulary order (GPT-2/CLIP byte-level BPE).

    Printable Latin-1 bytes keep their own code point and come first; every other byte is given a code point
    from 256 upwards, in byte order.
    """
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    kept_set = set(kept)
    others = [b for b in range(256) if b not in kept_set]
    return [chr(b) for b in kept] + [chr(256 + i) for i in range(len(others))]


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """Vocabulary (token → id) and ranked merges of CLIP's BPE, derived from open_clip's merges file."""
    lines = gzip.decompress(bpe_path().read_bytes()).decode("utf-8").split("\n")
    merges = tuple(tuple(line.split()) for line in lines[1 : 1 + _N_MERGES])
    if len(merges) != _N_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{bpe_path()}: expected {_N_MERGES} merge pairs after the header")
    symbols = _byte_symbols()
    tokens = [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges), BOS_TOKEN, EOS_TOKEN]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    assert len(vocab) == VOCAB_SIZE, len(vocab)
    return vocab, merges  # type: ignore[return-value]


def build_clip_tokenizer(
    *, exclamation_as_pad: bool = True, add_tokens: Sequence[str] = (), max_length: int = CONTEXT_LENGTH
) -> CLIPTokenizer:
    """Build (uncached) a transformers ``CLIPTokenizer`` equal to Stable Cascade's, without any network access.

    Args:
        exclamation_as_pad: True matches the official HF laion tokenizer, where ``"!"`` is the special pad token
            and a literal ``"!"`` in text becomes id 0. False keeps pad id 0 but encodes ``"!"`` with the BPE
            (open_clip's ids).
        add_tokens: New plain tokens (e.g. LoRA ReToken ``"[fernando]"``), given ids 49408, 49409, ... in order.
        max_length: ``model_max_length`` of the tokenizer (77 for CLIP).

    Returns:
        A checked tokenizer (see :func:`check_clip_tokenizer`).
    """
    vocab, merges = clip_vocab_and_merges()
    common = {"vocab": dict(vocab), "merges": list(merges), "model_max_length": max_length}
    if exclamation_as_pad:
        # As in the laion config: "!" is an added special token (matched on the raw text) and the pad token.
        pad = AddedToken(PAD_TOKEN, special=True, normalized=False, lstrip=False, rstrip=False)
        tok = CLIPTokenizer(pad_token=pad, **common)
    else:
        tok = CLIPTokenizer(**common)
        # Pad id 0 without registering "!" as an added token, so "!" in text still goes through the BPE.
        tok.pad_token_id = PAD_ID
    if add_tokens:
        new = [t for t in add_tokens if t not in tok.get_vocab()]
        if len(new) != len(add_tokens) or len(set(add_tokens)) != len(add_tokens):
            raise ValueError(f"add_tokens={list(add_tokens)!r}: tokens must be new and distinct")
        tok.add_tokens(list(add_tokens))
    check_clip_tokenizer(tok, exclamation_as_pad=exclamation_as_pad, n_added=len(add_tokens))
    return tok


def check_clip_tokenizer(tok: CLIPTokenizer, *, exclamation_as_pad: bool, n_added: int = 0) -> None:
    """Raise ``ValueError`` unless ``tok`` has CLIP's vocabulary, specials, pad id 0 and the chosen "!" rule."""
    problems = []
    if tok.vocab_size != VOCAB_SIZE or len(tok) != VOCAB_SIZE + n_added:
        problems.append(f"vocab_size={tok.vocab_size}, len={len(tok)} (want {VOCAB_SIZE} + {n_added} added)")
    got = (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    if got != (BOS_ID, EOS_ID, PAD_ID):
        problems.append(f"bos/eos/pad ids {got} (want {(BOS_ID, EOS_ID, PAD_ID)})")
    for text, ids in KNOWN_IDS.items():
        if tok(text)["input_ids"] != [BOS_ID, *ids, EOS_ID]:
            problems.append(f"{text!r} -> {tok(text)['input_ids']} (want {[BOS_ID, *ids, EOS_ID]})")
    bang = tok("!")["input_ids"][1:-1]
    if bang != ([PAD_ID] if exclamation_as_pad else [256]):
        problems.append(f"'!' -> {bang} with exclamation_as_pad={exclamation_as_pad}")
    if problems:
        raise ValueError("CLIP tokenizer is not the released one: " + "; ".join(problems))


@lru_cache(maxsize=8)
def _cached(exclamation_as_pad: bool, add_tokens: tuple[str, ...], max_length: int) -> CLIPTokenizer:
    return build_clip_tokenizer(
        exclamation_as_pad=exclamation_as_pad, add_tokens=add_tokens, max_length=max_length
    )


def clip_tokenizer(
    *, exclamation_as_pad: bool = True, add_tokens: Sequence[str] = (), max_length: int = CONTEXT_LENGTH
) -> CLIPTokenizer:
    """Cached :func:`build_clip_tokenizer` (one instance per argument set; treat it as read-only).

    Do not call ``add_tokens`` on the returned object (it is shared); pass ``add_tokens=`` instead.
    """
    if isinstance(add_tokens, str):
        raise TypeError(f"add_tokens={add_tokens!r}: pass a sequence of strings, not one string")
    return _cached(bool(exclamation_as_pad), tuple(add_tokens), int(max_length))


def tokenize_captions(
    tokenizer: CLIPTokenizer, captions: Sequence[str], *, max_length: int = CONTEXT_LENGTH
) -> dict[str, torch.Tensor]:
    """Stable Cascade's tokenizer call: pad to ``max_length`` (77) with id 0, truncate, eos last.

    Args:
        tokenizer: From :func:`clip_tokenizer`.
        captions: One string per sample ("" for the unconditional caption).
        max_length: Sequence length (77).

    Returns:
        ``{"input_ids": int64 (B, max_length), "attention_mask": int64 (B, max_length)}``.
    """
    if isinstance(captions, str):
        raise TypeError("captions must be a sequence of strings, not a single string")
    captions = list(captions)
    for i, caption in enumerate(captions):
        if not isinstance(caption, str):
            raise TypeError(f"captions[{i}] is {type(caption).__name__}, must be str")
    if not captions:
        empty = torch.zeros(0, max_length, dtype=torch.long)
        return {"input_ids": empty, "attention_mask": empty.clone()}
    enc = tokenizer(
        captions,
        padding="max_length",
        max_length=max_length,
        truncation=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
