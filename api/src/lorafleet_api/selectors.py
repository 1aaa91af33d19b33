"""Label selectors (``matchLabels``, ``matchExpressions``): as list-call strings, and matched locally.

A TrainerPool's ``spec.serving.selector`` names its inference servers. The operator lists them with
the selector's string form and matches each pod again (a server that ignores the selector must not
make trainers publish to pods the pool does not select); the gateway finds the servers it routes
to the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

_OPERATORS = {"In": "in", "NotIn": "notin"}


class SelectorError(ValueError):
    """``spec.serving.selector`` cannot be turned into a label selector; the message says why."""


def selector_string(selector: Mapping[str, Any]) -> str:
    """A LabelSelector (matchLabels, matchExpressions) in the list call's string form."""
    parts = [f"{k}={v}" for k, v in sorted((selector.get("matchLabels") or {}).items())]
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
        if not key:
            raise SelectorError("spec.serving.selector.matchExpressions: an expression has no key")
        if op in _OPERATORS and values:
            parts.append(f"{key} {_OPERATORS[op]} ({','.join(values)})")
        elif op == "Exists":
            parts.append(key)
        elif op == "DoesNotExist":
            parts.append(f"!{key}")
        else:
            raise SelectorError(
                f"spec.serving.selector.matchExpressions[{key}]: operator {op!r} is not valid"
            )
    if not parts:
        raise SelectorError("spec.serving.selector selects nothing: give matchLabels or matchExpressions")
    return ",".join(parts)


def matches(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """Whether a pod with ``labels`` is selected (the same rules as the API server's)."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }.get(op, False)
        if not ok:
            return False
    return True
