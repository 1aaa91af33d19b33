"""Bearer tokens scoped to namespaces: a token may use the adapters of the namespaces it names.

The tokens file is JSON, ``{"<token>": ["team-a", "team-b"]}``; ``"*"`` names every namespace. A
request without a known token is refused with 401, one for another namespace with 403, before
anything is read or changed. Without a tokens file every request is let through.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Mapping
from pathlib import Path


class Refused(Exception):
    def __init__(self, status: int, message: str, field: str = "model") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field  # the body field that named the adapter (401s name Authorization)


class Tokens:
    def __init__(self, scopes: Mapping[str, list[str]] | None) -> None:
        self._scopes = dict(scopes) if scopes is not None else None

    @classmethod
    def load(cls, path: Path | None) -> Tokens:
        if path is None:
            return cls(None)
        doc = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(doc, dict) or not all(
            isinstance(k, str) and k and isinstance(v, list) and all(isinstance(n, str) for n in v)
            for k, v in doc.items()
        ):
            raise ValueError(f"{path}: must be a JSON object of token -> list of namespaces")
        return cls(doc)

    def namespaces(self, authorization: str | None) -> set[str] | None:
        """The namespaces the caller may use (None: all); raises :class:`Refused` (401)."""
        if self._scopes is None:
            return None
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Refused(401, "Authorization: a bearer token is required")
        for known, namespaces in self._scopes.items():
            if hmac.compare_digest(known.encode(), token.encode()):
                return None if "*" in namespaces else set(namespaces)
        raise Refused(401, "Authorization: the token is not known")

    @staticmethod
    def check(allowed: set[str] | None, namespace: str, field: str = "model") -> None:
        """Raises :class:`Refused` (403, naming ``field``) unless ``namespace`` is allowed."""
        if allowed is not None and namespace not in allowed:
            raise Refused(403, f"{field}: the token may not use adapters of namespace {namespace!r}", field)
