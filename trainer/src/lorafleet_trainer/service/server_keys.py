"""The API key the pool's inference servers require (vLLM's ``--api-key``), read from a file.

The operator mounts the Secret that ``spec.serving.apiKeySecretRef`` names into the trainer pod as
an optional file. The file is read again on every call to a server: the kubelet writes it when the
Secret is created after the pod, and rewrites it when the key is rotated, so neither needs a new
pod. While it is missing or empty, every call fails with a :class:`~.publishing.PublishError` that
names the Secret and key (never the key itself), which the adapters' Served condition shows.
"""

from __future__ import annotations

from pathlib import Path

from lorafleet_trainer.service.publishing import PublishError

REASON = "api_key"  # publishing.REASONS: no key to send


class ServerKey:
    """Where the servers' API key is kept: ``path``, from ``secret`` (``name/key``, for messages)."""

    def __init__(self, path: Path, secret: str | None = None) -> None:
        self.path = path
        self.secret = secret

    def _source(self) -> str:
        if self.secret is None:
            return f"the file {self.path}"
        name, _, key = self.secret.partition("/")
        return f"key {key!r} of Secret {name!r} (spec.serving.apiKeySecretRef)"

    def read(self) -> str:
        """The key, without surrounding whitespace; raises PublishError when there is none."""
        try:
            key = self.path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            raise PublishError(
                REASON,
                f"the inference servers' API key is missing: {self._source()} does not exist "
                "in the pool's namespace",
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            why = getattr(exc, "strerror", None) or "not UTF-8 text"
            raise PublishError(REASON, f"the inference servers' API key, {self._source()}: {why}") from None
        if not key:
            raise PublishError(REASON, f"the inference servers' API key is empty: {self._source()}")
        return key
