"""Small field validators shared by the request-shaped dataclasses (configs, samples).

Each helper checks one JSON value and raises :class:`InvalidInput` naming the full field path
(``training.alpha``, ``samples[2].response_logprobs[7]``) so a client can find what to fix.
JSON booleans are rejected where a number is expected: ``True`` is an ``int`` in Python but never
a meaningful rank or learning rate.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from lorafleet_trainer.errors import InvalidInput


def require_mapping(value: Any, field: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise InvalidInput("must be an object", field=field)
    return value


def reject_unknown(d: Mapping[str, Any], known: set[str] | frozenset[str], field: str) -> None:
    unknown = sorted(str(k) for k in d if k not in known)
    if unknown:
        raise InvalidInput(f"unknown field(s) {unknown}; expected some of {sorted(known)}", field=field)


def finite_number(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidInput("must be a number", field=field)
    out = float(value)
    if not math.isfinite(out):
        raise InvalidInput("must be finite", field=field)
    return out


def number_in(
    value: Any,
    field: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """A finite number within [low, high] (or open at either end)."""
    out = finite_number(value, field)
    if low is not None and (out < low or (low_open and out == low)):
        raise InvalidInput(f"must be {'>' if low_open else '>='} {low}, got {out}", field=field)
    if high is not None and (out > high or (high_open and out == high)):
        raise InvalidInput(f"must be {'<' if high_open else '<='} {high}, got {out}", field=field)
    return out


def integer_in(value: Any, field: str, *, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        # JSON decoders give 8.0 for "8.0"; accept integral floats, refuse 8.5.
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise InvalidInput("must be an integer", field=field)
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"between {low} and {high}"
        raise InvalidInput(f"must be {bound}, got {value}", field=field)
    return int(value)


def string(value: Any, field: str, *, allow_empty: bool = True) -> str:
    if not isinstance(value, str):
        raise InvalidInput("must be a string", field=field)
    if not allow_empty and not value:
        raise InvalidInput("must not be empty", field=field)
    return value
