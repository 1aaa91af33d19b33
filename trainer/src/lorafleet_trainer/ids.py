"""Adapter identities: a Kubernetes namespace and name, both DNS-1123 labels.

Validating both parts as DNS-1123 labels (lowercase alphanumerics and '-', 1..63 characters, no
leading or trailing '-') is what keeps an id from naming a path outside the storage root: no '/',
no '.', no '..', no percent-escapes survive it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lorafleet_trainer.errors import InvalidInput

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
MAX_LABEL_LENGTH = 63


def validate_label(value: str, field: str) -> str:
    """Return ``value`` if it is a DNS-1123 label, else raise :class:`InvalidInput` naming ``field``."""
    if not isinstance(value, str) or not value:
        raise InvalidInput("must be a non-empty DNS-1123 label", field=field)
    if len(value) > MAX_LABEL_LENGTH:
        raise InvalidInput(f"must be at most {MAX_LABEL_LENGTH} characters", field=field)
    if not _DNS1123_LABEL.fullmatch(value):
        raise InvalidInput(
            "must be a DNS-1123 label: lowercase letters, digits and '-', starting and ending "
            "with a letter or digit",
            field=field,
        )
    return value


@dataclass(frozen=True, order=True)
class AdapterId:
    """The identity of one adapter; ``str()`` gives ``namespace/name``."""

    namespace: str
    name: str

    def __post_init__(self) -> None:
        validate_label(self.namespace, "namespace")
        validate_label(self.name, "name")

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"

    @classmethod
    def parse(cls, key: str) -> AdapterId:
        """Parse ``namespace/name``."""
        namespace, sep, name = key.partition("/")
        if not sep:
            raise InvalidInput("must be 'namespace/name'", field="adapter")
        return cls(namespace, name)
