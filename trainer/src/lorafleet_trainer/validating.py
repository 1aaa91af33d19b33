"""Small field validators shared by the request-shaped dataclasses (configs, samples).

Each helper checks one JSON value and raises :class:`InvalidInput` naming the full field path
(``training.alpha``, ``samples[2].response_logprobs[7]``) so a client can find what to fix.
JSON booleans are rejected where a number is expected: ``True`` is an ``int`` in Python but never
a meaningful rank or learning rate.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from lorafleet_trainer.errors import InvalidInput

M = TypeVar("M", bound=BaseModel)


def field_path(loc: Sequence[Any]) -> str:
    """('samples', 0, 'feedback') -> 'samples[0].feedback'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + str(part)
    return out


def parsed(model: type[M], value: Any, field: str) -> M:
    """``value`` validated by a wire model; its first error raised as :class:`InvalidInput` naming
    the field under ``field`` (``lora.target_modules[1]``)."""
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        at = field_path([field, *first["loc"]])
        raise InvalidInput(first["msg"], field=at) from None


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


def string(value: Any, field: str, *, allow_empty: bool = True) -> str:
    if not isinstance(value, str):
        raise InvalidInput("must be a string", field=field)
    if not allow_empty and not value:
        raise InvalidInput("must not be empty", field=field)
    return value
