"""Bearer tokens scoped to namespaces."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorafleet_gateway.tenancy import Refused, Tokens


def test_a_token_may_use_its_namespaces_only(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"tok-a": ["team-a"], "tok-admin": ["*"]}))
    tokens = Tokens.load(path)
    allowed = tokens.namespaces("Bearer tok-a")
    assert allowed == {"team-a"}
    Tokens.check(allowed, "team-a")
    with pytest.raises(Refused) as other:
        Tokens.check(allowed, "team-b")
    assert other.value.status == 403 and "team-b" in other.value.message
    assert tokens.namespaces("Bearer tok-admin") is None
    for header in (None, "Bearer", "Basic tok-a", "Bearer tok-x"):
        with pytest.raises(Refused) as refused:
            tokens.namespaces(header)
        assert refused.value.status == 401


def test_a_malformed_tokens_file_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"tok": "team-a"}))
    with pytest.raises(ValueError, match=r"tokens\.json"):
        Tokens.load(path)


def test_without_a_tokens_file_everything_is_allowed() -> None:
    assert Tokens.load(None).namespaces(None) is None
