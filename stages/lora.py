"""Stage C LoRA and ReToken in the official file format (spec §1.8).

Both are ``torch.nn.utils.parametrize`` parametrizations, so the generator and the CLIP text model keep
their modules and only gain ``parametrizations.<name>.original`` keys until :func:`merge_lora` folds the
deltas back in. The saved object is ``nn.ModuleDict{'embeddings': ReToken, 'weights': ModuleList[LoRA]}``
with keys ``embeddings.embeddings``, ``embeddings.indices``, ``weights.{i}.lora_down`` and
``weights.{i}.lora_up``, where ``i`` follows ``generator.modules()`` order: per AttnBlock the
``out_proj`` LoRA comes first, then the ``in_proj`` one.

The ``embeddings`` entry is always there, as in the official script (which always builds a ReToken): with
no trained tokens it is empty, ``embeddings.embeddings`` (0, C_text) and ``embeddings.indices`` (0,), so
the official strict ``load_state_dict`` accepts our files and ours accepts theirs.

Parametrized modules cannot be pickled; merge (or ship state dicts) before sending a model to a worker.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import FrozenInstanceError
from typing import Protocol

import torch
from torch import nn
from torch.nn.utils import parametrize

from stages.weights import WeightsError, check_state_dict, read_safetensors, save_weights

DEFAULT_FILTERS: tuple[str, ...] = (".attn",)


class LoRA(nn.Module):
    """Low-rank delta on one weight: W' = W + (up @ down)·(alpha/rank) (Hu et al. 2021, eq. 3).

    ``lora_down`` (rank, in) starts at zero and ``lora_up`` (out, rank) ~ N(0, 1), so a fresh LoRA is
    the identity. ``in`` is the product of the trailing weight dims (the input width for Linear, 1×1
    convs and the MHA ``in_proj_weight``).
    """

    def __init__(self, layer: nn.Module, name: str = "weight", rank: int = 16, alpha: float = 1.0) -> None:
        super().__init__()
        if rank <= 0:
            raise ValueError(f"rank must be a positive integer, got {rank!r}")
        weight = getattr(layer, name)
        if not isinstance(weight, torch.Tensor) or weight.dim() < 2:
            raise ValueError(f"LoRA needs a weight with at least 2 dims at {name!r}, got {weight!r}")
        out_features, in_features = weight.shape[0], weight[0].numel()
        kwargs = {"device": weight.device, "dtype": weight.dtype}
        self.rank = rank
        self.alpha = alpha
        self.param_order = list(layer._parameters)  # restored by merge_lora so key order matches the original
        self.lora_down = nn.Parameter(torch.zeros(rank, in_features, **kwargs))
        self.lora_up = nn.Parameter(torch.randn(out_features, rank, **kwargs))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        delta = (self.lora_up @ self.lora_down).view(weight.shape)
        return weight + delta * (self.alpha / self.rank)

    def extra_repr(self) -> str:
        return (
            f"rank={self.rank}, alpha={self.alpha}, out={self.lora_up.shape[0]}, in={self.lora_down.shape[1]}"
        )


# Defaults of the official ReToken: it always makes (len(indices), 1280) embeddings.
DEFAULT_TEXT_DIM = 1280
INDEX_KEY = "embeddings.indices"
EMBEDDINGS_KEY = "embeddings.embeddings"

# The dtype of an *empty* ``indices`` buffer. The official ReToken stores ``torch.tensor(indices)`` built
# from a Python list: a non-empty list of ints gives int64, but ``train_tokens: []`` gives the empty list,
# and ``torch.tensor([])`` has no element to infer an integer dtype from, so it takes the default float
# dtype, float32 (shape (0,)). We write that same dtype so our file declares what the official script
# writes for that config; ``load_state_dict`` only checks shapes (``copy_`` casts), so either dtype loads
# on both sides, and :func:`load_lora` accepts an empty index tensor of any dtype.
EMPTY_INDEX_DTYPE = torch.float32


class ReToken(nn.Module):
    """Learned deltas added to selected rows of a token-embedding matrix (zero-initialised).

    ``indices`` is int64 when tokens are given; an empty ReToken (no trained tokens) keeps a float32 (0,)
    buffer, as the official code does (see ``EMPTY_INDEX_DTYPE``), and is the identity.
    """

    indices: torch.Tensor

    def __init__(
        self,
        indices: Sequence[int] | torch.Tensor,
        dim: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        index = torch.as_tensor(indices, device=device).flatten()
        if index.numel() == 0:
            index = index.to(EMPTY_INDEX_DTYPE)
        elif index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
            raise TypeError(f"ReToken indices must be integer token ids, got dtype {index.dtype}")
        else:
            index = index.long()
        self.embeddings = nn.Parameter(torch.zeros(index.numel(), dim, device=device, dtype=dtype))
        self.register_buffer("indices", index)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.indices.numel() == 0:
            return weight
        return weight.index_add(0, self.indices.long(), self.embeddings.to(weight.dtype))

    def extra_repr(self) -> str:
        return f"tokens={self.indices.numel()}, dim={self.embeddings.shape[1]}"


def _lora_target(module: nn.Module) -> str | None:
    """The tensor name LoRA parametrises on ``module``: a plain ``weight`` Parameter, else ``in_proj_weight``."""
    if parametrize.is_parametrized(module):
        return None
    for name in ("weight", "in_proj_weight"):
        value = module._parameters.get(name)
        if isinstance(value, nn.Parameter):
            return name
    return None


def apply_lora(
    model: nn.Module, filters: Sequence[str] = DEFAULT_FILTERS, rank: int = 4, alpha: float = 1.0
) -> nn.ModuleList:
    """Parametrise every module whose ``named_modules()`` name contains a filter substring.

    Matching modules without a plain ``weight`` or ``in_proj_weight`` Parameter (and modules already
    parametrised) are skipped. On Stage C with ``('.attn',)`` this hits each MHA ``in_proj_weight`` and
    each ``attn.out_proj.weight``.

    Returns:
        The new LoRA modules in ``model.modules()`` order (the official ``weights.{i}`` order).

    Raises:
        ValueError: no module matched, so nothing would be trained.
    """
    if isinstance(filters, str):
        raise TypeError(f"filters must be a sequence of substrings, got the string {filters!r}")
    targets = [
        (module, tensor)
        for name, module in model.named_modules()
        if any(f in name for f in filters) and (tensor := _lora_target(module)) is not None
    ]
    if not targets:
        raise ValueError(f"filters={list(filters)!r} matched no weight in {type(model).__name__}")
    created: set[int] = set()
    for module, tensor in targets:
        lora = LoRA(module, tensor, rank=rank, alpha=alpha)
        parametrize.register_parametrization(module, tensor, lora)
        created.add(id(lora))
    return nn.ModuleList([m for m in model.modules() if id(m) in created])


def token_embedding(text_model: nn.Module) -> nn.Embedding:
    """The token-embedding layer of a CLIP text model (``text_model.embeddings.token_embedding``)."""
    getter = getattr(text_model, "get_input_embeddings", None)
    if callable(getter):
        emb = getter()
        if isinstance(emb, nn.Embedding):
            return emb
    for name, module in text_model.named_modules():
        if name.endswith("token_embedding") and isinstance(module, nn.Embedding):
            return module
    raise TypeError(f"{type(text_model).__name__} has no nn.Embedding named 'token_embedding'")


def apply_retoken(text_model: nn.Module, indices: Sequence[int] | torch.Tensor) -> ReToken:
    """Register a zero-initialised :class:`ReToken` on the text model's token-embedding weight."""
    emb = token_embedding(text_model)
    index = torch.as_tensor(indices, dtype=torch.long).flatten()
    if index.numel() == 0:
        raise ValueError("retoken indices are empty: no token would be trained")
    if index.min() < 0 or index.max() >= emb.num_embeddings:
        raise ValueError(f"retoken indices must lie in [0, {emb.num_embeddings}), got {index.tolist()}")
    retoken = ReToken(index, emb.embedding_dim, device=emb.weight.device, dtype=emb.weight.dtype)
    parametrize.register_parametrization(emb, "weight", retoken)
    return retoken


class Tokenizer(Protocol):
    """What :func:`add_train_tokens` needs from a (transformers) tokenizer."""

    def add_tokens(self, new_tokens: list[str]) -> int: ...

    def get_vocab(self) -> dict[str, int]: ...


def _is_new_token(token: str) -> bool:
    return len(token) > 2 and ((token[0], token[-1]) in (("[", "]"), ("<", ">")))


def _append_row(emb: nn.Embedding, row: torch.Tensor) -> None:
    weight = emb.weight
    new = torch.cat([weight.detach(), row.to(weight.dtype).view(1, -1)], dim=0)
    emb.weight = nn.Parameter(new, requires_grad=weight.requires_grad)
    emb.num_embeddings = new.shape[0]


def add_train_tokens(
    tokenizer: Tokenizer, text_model: nn.Module, train_tokens: Sequence[Sequence[str | None]]
) -> list[int]:
    """Resolve the config's ``train_tokens`` into embedding rows for :class:`ReToken` (spec §1.8).

    Each entry is ``[token, init_regex]`` (``init_regex`` optional). A token written ``[..]`` or ``<..>``
    is added to the tokenizer and gets a new embedding row: the mean of the rows of vocab entries where
    ``re.search(init_regex, entry)`` matches, or zeros when nothing matches; its id is
    ``len(vocab) - 1`` (49408 for the CLIP vocabulary). Any other first element is a regex
    (``re.search``) selecting existing vocab entries to fine-tune.

    Returns:
        The token ids to train, in entry order.

    Raises:
        ValueError: a new token already exists, the embedding and vocab sizes disagree, or a regex
            selects nothing.
    """
    emb = token_embedding(text_model)
    if parametrize.is_parametrized(emb):
        raise ValueError("add tokens before applying ReToken: the token embedding is already parametrised")
    indices: list[int] = []
    for entry in train_tokens:
        if isinstance(entry, str) or not 1 <= len(entry) <= 2:
            raise ValueError(f"train_tokens entries must be [token] or [token, init_regex], got {entry!r}")
        token, init_regex = entry[0], (entry[1] if len(entry) > 1 else None)
        vocab = tokenizer.get_vocab()
        if not _is_new_token(token):
            selected = sorted(i for k, i in vocab.items() if re.search(token, k))
            if not selected:
                raise ValueError(f"train_tokens regex {token!r} matches no vocabulary entry")
            indices += selected
            continue
        if token in vocab:
            raise ValueError(f"train token {token!r} is already in the vocabulary (id {vocab[token]})")
        if emb.num_embeddings != len(vocab):
            raise ValueError(
                f"the token embedding has {emb.num_embeddings} rows but the tokenizer has {len(vocab)} entries"
            )
        rows = [i for k, i in vocab.items() if init_regex is not None and re.search(init_regex, k)]
        weight = emb.weight.detach()
        row = weight[rows].mean(dim=0) if rows else weight.new_zeros(weight.shape[1])
        tokenizer.add_tokens([token])
        new_id = len(tokenizer.get_vocab()) - 1
        if tokenizer.get_vocab().get(token) != new_id:
            raise ValueError(f"the tokenizer did not give {token!r} the last id {new_id}")
        _append_row(emb, row)
        indices.append(new_id)
    _update_vocab_size(text_model, emb.num_embeddings)
    return indices


def _update_vocab_size(text_model: nn.Module, vocab_size: int) -> None:
    """Set ``vocab_size`` on every mutable ``config`` in the model (HF configs); frozen ones are left alone."""
    seen: set[int] = set()
    for module in text_model.modules():
        config = getattr(module, "config", None)
        if config is None or id(config) in seen or not hasattr(config, "vocab_size"):
            continue
        seen.add(id(config))
        try:
            config.vocab_size = vocab_size
        except (AttributeError, TypeError, FrozenInstanceError):
            warnings.warn(
                f"{type(config).__name__}.vocab_size is read-only and stays {config.vocab_size}; "
                f"the token embedding now has {vocab_size} rows",
                stacklevel=3,
            )


def _text_dim(stage_c: nn.Module, text_dim: int | None) -> int:
    """C_text for an empty ReToken: ``text_dim``, else Stage C's ``config.c_clip_text``, else 1280."""
    if text_dim is None:
        text_dim = getattr(getattr(stage_c, "config", None), "c_clip_text", None)
        if not isinstance(text_dim, int) or isinstance(text_dim, bool):
            text_dim = DEFAULT_TEXT_DIM
    if not isinstance(text_dim, int) or isinstance(text_dim, bool) or text_dim <= 0:
        raise ValueError(f"text_dim must be a positive integer, got {text_dim!r}")
    return text_dim


def build_lora(
    stage_c: nn.Module,
    text_model: nn.Module | None = None,
    *,
    filters: Sequence[str] = DEFAULT_FILTERS,
    rank: int = 4,
    retoken_indices: Sequence[int] | torch.Tensor | None = None,
    text_dim: int | None = None,
) -> nn.ModuleDict:
    """Apply LoRA to Stage C (and ReToken to the text model) and bundle them as the official ``lora``.

    ``embeddings`` is always present, as in the official script. With no ``text_model``, or with empty
    ``retoken_indices``, it is an empty ReToken (``embeddings.embeddings`` (0, C_text), float32
    ``embeddings.indices`` (0,)) attached to nothing; its parameter has ``requires_grad=False`` so an
    optimizer built from ``requires_grad`` parameters (jobs/train_loop.py) leaves it out: nothing could
    train it, and a parameter outside the generator breaks ``get_optimizer_state_dict(generator, ...)``.

    Args:
        text_dim: C_text of an empty ReToken when there is no ``text_model`` (whose token-embedding width
            is used otherwise); default ``stage_c.config.c_clip_text`` if present, else 1280 (bigG).

    Returns:
        ``ModuleDict{'embeddings': ReToken, 'weights': ModuleList[LoRA]}``.
    """
    if (text_model is None) != (retoken_indices is None):
        raise ValueError("text_model and retoken_indices must be given together (ReToken needs both)")
    width = (
        token_embedding(text_model).embedding_dim if text_model is not None else _text_dim(stage_c, text_dim)
    )
    if text_dim is not None and text_dim != width:
        raise ValueError(f"text_dim={text_dim} differs from the text model's embedding width {width}")
    has_tokens = retoken_indices is not None and torch.as_tensor(retoken_indices).numel() > 0
    bundle = nn.ModuleDict()
    if has_tokens:
        assert text_model is not None and retoken_indices is not None
        bundle["embeddings"] = apply_retoken(text_model, retoken_indices)
    weights = apply_lora(stage_c, filters, rank)
    if not has_tokens:
        bundle["embeddings"] = ReToken([], width, device=weights[0].lora_up.device).requires_grad_(False)
    bundle["weights"] = weights
    return bundle


def _lora_state(lora: nn.Module, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """The bundle's state dict with float tensors cast to ``dtype``, except the (float32 when empty) indices."""
    state = lora.state_dict()
    if dtype is None:
        return state
    return {k: v.to(dtype) if v.is_floating_point() and k != INDEX_KEY else v for k, v in state.items()}


def save_lora(lora: nn.Module, path: str | os.PathLike, *, dtype: torch.dtype | None = None) -> str:
    """Write the ``lora`` bundle's state dict as safetensors (local path or fsspec URL); returns sha256.

    ``dtype`` casts the float weights; ``embeddings.indices`` keeps its dtype (float32 when empty).
    """
    return save_weights(_lora_state(lora, dtype), path)


def load_lora(lora: nn.Module, path: str | os.PathLike) -> str:
    """Strictly load a LoRA/ReToken safetensors file into a bundle from :func:`build_lora`.

    Float tensors are cast to the bundle's dtype. ``embeddings.indices`` must be integer token ids; an
    empty one may have any dtype (the official script writes float32 for ``train_tokens: []``). Different
    ReToken ``indices`` values are loaded as stored (as the official code does) with a warning. A file
    written before the ``embeddings`` keys were always saved (no such keys at all) loads, with a warning,
    into a bundle whose ReToken is empty.

    Returns:
        The file's sha256.

    Raises:
        WeightsError: missing/unexpected keys or wrong shapes (the message names the file and the keys),
            float token ids, or trained tokens in the file for a bundle built without a text model.
    """
    loaded = read_safetensors(path)
    file_state = dict(loaded.state_dict)
    expected = lora.state_dict()
    if INDEX_KEY in expected and expected[INDEX_KEY].numel() == 0:
        n_file = file_state[INDEX_KEY].numel() if INDEX_KEY in file_state else 0
        if n_file:
            raise WeightsError(
                f"{loaded.path}: the file trains {n_file} token(s) ({INDEX_KEY} "
                f"{file_state[INDEX_KEY].tolist()}); build the bundle with text_model and retoken_indices"
            )
        if INDEX_KEY not in file_state and EMBEDDINGS_KEY not in file_state:
            warnings.warn(
                f"{loaded.path}: no {EMBEDDINGS_KEY}/{INDEX_KEY} (written before they were always saved); "
                "loading it as an empty ReToken. The official script needs them: re-save with save_lora.",
                stacklevel=2,
            )
            file_state[EMBEDDINGS_KEY] = expected[EMBEDDINGS_KEY]
            file_state[INDEX_KEY] = expected[INDEX_KEY]
    check_state_dict(lora, file_state, loaded.path)
    index = file_state.get(INDEX_KEY)
    if index is not None and index.numel() > 0 and not _is_integer(index):
        raise WeightsError(f"{loaded.path}: {INDEX_KEY} must hold integer token ids, got {index.dtype}")
    state = {k: v.to(expected[k].dtype) for k, v in file_state.items()}
    if INDEX_KEY in state and not torch.equal(state[INDEX_KEY].cpu(), expected[INDEX_KEY].cpu()):
        warnings.warn(
            f"{loaded.path}: {INDEX_KEY} {state[INDEX_KEY].tolist()} differ from the built "
            f"{expected[INDEX_KEY].tolist()}; using the file's",
            stacklevel=2,
        )
    lora.load_state_dict(state, strict=True)
    return loaded.sha256


def _is_integer(t: torch.Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA/ReToken delta into its weight and drop the parametrizations (in place).

    Afterwards ``model.state_dict()`` has the plain official keys again. Call it on the generator and
    on the text model.
    """
    for module in list(model.modules()):
        if not parametrize.is_parametrized(module):
            continue
        for name, plist in list(module.parametrizations.items()):
            ours = [p for p in plist if isinstance(p, (LoRA, ReToken))]
            if not ours:
                continue
            order = next((p.param_order for p in ours if isinstance(p, LoRA)), None)
            parametrize.remove_parametrizations(module, name, leave_parametrized=True)
            if order is not None:
                _reorder_parameters(module, order)
    return model


def _reorder_parameters(module: nn.Module, order: list[str]) -> None:
    """Put a re-registered Parameter back at its original position (state-dict key order)."""
    params = module._parameters
    items = sorted(params.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order))
    params.clear()
    params.update(items)
