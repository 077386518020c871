"""The Ray auth token rayapp's clusters use: generated once per machine, readable by its owner only."""

from __future__ import annotations


def test_generated_token_is_private(tmp_path, monkeypatch):
    from rayapp.serving.local_head import ensure_auth_token

    path = tmp_path / "ray" / "auth_token"
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    assert ensure_auth_token() == path
    token = path.read_text()
    assert len(token) == 64 and int(token, 16) and path.stat().st_mode & 0o777 == 0o600
    assert ensure_auth_token() == path and path.read_text() == token  # once per machine, then reused
    path.chmod(0o644)
    ensure_auth_token()
    assert path.stat().st_mode & 0o777 == 0o600
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-the-environment")
    assert ensure_auth_token() is None
