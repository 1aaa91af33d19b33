"""Kubernetes resource quantities (``48Gi``, ``512Mi``, ``1.5G``) turned into whole bytes.

The CRD carries the cache capacity as a quantity string because that is what Kubernetes users
write; the trainer takes bytes, so the operator converts once, here, and rejects anything else.
"""

from __future__ import annotations

import re

_SUFFIXES = {
    "": 1,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
}
_PATTERN = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(Ki|Mi|Gi|Ti|k|M|G|T)?$")


def to_bytes(quantity: str | int, *, field: str) -> int:
    """Convert a quantity to bytes; ``field`` names the spec field in the error for a bad value."""
    if isinstance(quantity, bool):
        raise ValueError(f"{field}: expected a quantity such as 48Gi, got {quantity!r}")
    if isinstance(quantity, int):
        if quantity < 0:
            raise ValueError(f"{field}: must not be negative, got {quantity}")
        return quantity
    match = _PATTERN.match(quantity.strip())
    if match is None:
        raise ValueError(f"{field}: expected a quantity such as 48Gi, got {quantity!r}")
    number, suffix = match.group(1), match.group(2) or ""
    return int(float(number) * _SUFFIXES[suffix])
