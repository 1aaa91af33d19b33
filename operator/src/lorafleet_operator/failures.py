"""Reconcile errors that are retried or skipped: none may pass unseen.

A failed call inside a reconcile is either retried (kopf's backoff, the next timer tick or event)
or skipped (a cosmetic write, a poll that the next resync repeats). Either way it shows:
``skipped`` logs it once at WARNING with the object and the cause, and every error counts in
``lorafleet_operator_reconcile_errors_total{path}``, which the LoraFleetOperatorReconcileErrors
alert watches. A handler's error that kopf retries is logged by kopf itself (once, at ERROR, with
the object), so ``retried`` only counts it.
"""

from __future__ import annotations

import logging

from lorafleet_operator.metrics import ERROR_PATHS, OperatorMetrics

logger = logging.getLogger(__name__)


def _count(metrics: OperatorMetrics, path: str) -> None:
    if path not in ERROR_PATHS:
        raise ValueError(f"unknown reconcile error path {path!r}")  # a typo must not make a new series
    metrics.reconcile_errors.labels(path=path).inc()


def skipped(metrics: OperatorMetrics, path: str, what: str, exc: BaseException) -> None:
    """Log and count an error the operator skips; ``what`` names the object (``kind ns/name``)."""
    _count(metrics, path)
    logger.warning("%s: %s: %s (skipped; tried again later)", path, what, exc)


def retried(metrics: OperatorMetrics, path: str) -> None:
    """Count an error that kopf retries (and logs)."""
    _count(metrics, path)
