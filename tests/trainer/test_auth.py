"""Bearer-token checks and token files."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorafleet_trainer.http.auth import BearerAuth, Unauthorized, read_token


def test_no_token_configured_lets_everything_through() -> None:
    auth = BearerAuth(None)
    assert not auth.enabled
    auth.check(None)
    auth.check("Bearer anything")


@pytest.mark.parametrize(
    ("header", "why"),
    [
        (None, "missing"),
        ("", "missing"),
        ("Basic c2VjcmV0", "Bearer"),
        ("Bearer", "Bearer"),
        ("Bearer ", "Bearer"),
        ("Bearer secret2", "not valid"),
        ("Bearer secre", "not valid"),
        ("Bearer SECRET", "not valid"),
    ],
)
def test_wrong_or_missing_tokens_are_refused_naming_the_header(header: str | None, why: str) -> None:
    with pytest.raises(Unauthorized, match=why) as info:
        BearerAuth("secret").check(header)
    assert info.value.status_code == 401
    assert info.value.field == "authorization"


@pytest.mark.parametrize("header", ["Bearer secret", "bearer secret", "Bearer  secret "])
def test_the_right_token_passes(header: str) -> None:
    BearerAuth("secret").check(header)


def test_token_file_is_stripped_and_must_not_be_empty(tmp_path: Path) -> None:
    good = tmp_path / "token"
    good.write_text("s3cret\n")
    assert read_token(good) == "s3cret"
    empty = tmp_path / "empty"
    empty.write_text(" \n")
    with pytest.raises(ValueError, match="empty"):
        read_token(empty)
    with pytest.raises(ValueError, match="cannot read"):
        read_token(tmp_path / "absent")
