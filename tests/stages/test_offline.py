"""Nothing downloads, ever: building every flavor, the tokenizer and the encoders opens no socket."""

from __future__ import annotations

import socket

import pytest
import torch

from stages.flavors import FLAVORS, build_model


@pytest.fixture
def no_network(monkeypatch):
    attempts: list[object] = []

    def refuse(self, address, *args, **kwargs):
        attempts.append(address)
        raise OSError(f"network access attempted: {address!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: attempts.append(a) or [])
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # must not depend on the offline switch
    yield attempts
    assert attempts == []


def test_build_every_tiny_flavor_offline(no_network) -> None:
    from stages.tokenizer import build_clip_tokenizer

    for name in (n for n in FLAVORS if n.endswith("/tiny")):
        model, sha = build_model(name)
        assert sha is None and sum(p.numel() for p in model.parameters()) > 0
    tokenizer = build_clip_tokenizer()
    assert tokenizer("a photo of a cat")["input_ids"][0] == 49406
    text, _ = build_model("clip_text/tiny")
    with torch.no_grad():
        clip_text, pooled = text(["a photo of a cat"])
    assert clip_text.shape == (1, 77, 32) and pooled.shape == (1, 1, 32)


def test_released_flavors_build_on_meta_offline(no_network) -> None:
    for name in (n for n in FLAVORS if not n.endswith("/tiny")):
        assert FLAVORS[name].num_params() > 1_000_000
