"""Which auth token a submission sends, and where it says the token came from (no Ray, no network)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.submit import NO_TOKEN, resolve_token

TOKEN_VARS = ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE")


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """An empty HOME (no ~/.ray/auth_token) and no token variables."""
    monkeypatch.setenv("HOME", str(tmp_path))
    for var in TOKEN_VARS:
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def test_token_sources_follow_rays_order(home, monkeypatch) -> None:
    assert resolve_token() == (None, NO_TOKEN)
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text("file-token-0123456789\n")
    assert resolve_token() == ("file-token-0123456789", "token from ~/.ray/auth_token")
    (home / "elsewhere").write_text("path-token-0123456789")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(home / "elsewhere"))
    assert resolve_token() == ("path-token-0123456789", f"token from RAY_AUTH_TOKEN_PATH ({home}/elsewhere)")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "env-token-0123456789")
    assert resolve_token() == ("env-token-0123456789", "token from RAY_AUTH_TOKEN")
    assert resolve_token("arg-token-0123456789") == ("arg-token-0123456789", "token from the token argument")


def test_an_empty_default_file_is_no_token_and_a_bad_token_path_names_the_variable(home, monkeypatch) -> None:
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text("\n")
    assert resolve_token() == (None, NO_TOKEN)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(home / "missing"))
    with pytest.raises(ValueError, match=f"RAY_AUTH_TOKEN_PATH={home}/missing: no such file"):
        resolve_token()
