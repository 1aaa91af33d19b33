"""Bearer-token authentication for the ``/v1`` routes.

The token comes from a file (a mounted Kubernetes Secret), never from a flag, so it does not show up
in process listings. Tokens are compared with ``hmac.compare_digest`` so the time a wrong guess
takes says nothing about how much of it matched. Probes and ``/metrics`` are not behind this check.
"""

from __future__ import annotations

import hmac
from pathlib import Path

from lorafleet_trainer.errors import TrainerError


class Unauthorized(TrainerError):
    """The request lacks a valid ``Authorization: Bearer`` header (HTTP 401)."""

    status_code = 401


def read_token(path: Path) -> str:
    """The token in ``path`` without surrounding whitespace (Secrets often end in a newline)."""
    try:
        token = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ValueError(f"cannot read the auth token file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ValueError(f"the auth token file {path} is not UTF-8 text") from None
    if not token:
        raise ValueError(f"the auth token file {path} is empty")
    return token


class BearerAuth:
    """Checks ``Authorization`` headers against one token; with no token every request passes."""

    def __init__(self, token: str | None) -> None:
        self._expected = token.encode("utf-8") if token is not None else None

    @property
    def enabled(self) -> bool:
        return self._expected is not None

    def check(self, authorization: str | None) -> None:
        """Raise :class:`Unauthorized` unless the header carries the configured token."""
        if self._expected is None:
            return
        if not authorization:
            raise Unauthorized("missing; expected 'Bearer <token>'", field="authorization")
        scheme, _, presented = authorization.partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            raise Unauthorized("must be 'Bearer <token>'", field="authorization")
        if not hmac.compare_digest(presented.strip().encode("utf-8"), self._expected):
            raise Unauthorized("the bearer token is not valid", field="authorization")
