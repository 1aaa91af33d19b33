"""The gateway's Prometheus metrics (``lorafleet_gateway_*``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.requests = Counter(
            "lorafleet_gateway_requests",
            "Requests answered, by route (the matched route's template, or unmatched), model (the "
            "adapter it resolved to, namespace/adapter; empty before one is) and HTTP code.",
            ["route", "model", "code"],
            registry=self.registry,
        )
        self.upstream_seconds = Histogram(
            "lorafleet_gateway_upstream_seconds",
            "Time to an upstream's answer (an inference server's or a trainer's), by route.",
            ["route"],
            registry=self.registry,
        )
        self.routing = Counter(
            "lorafleet_gateway_routing_decisions",
            "Where chats went: a server with the latest version, an older one, or none.",
            ["decision"],
            registry=self.registry,
        )
        self.records = Counter(
            "lorafleet_gateway_record_lookups",
            "Feedback looked up in the completion record: hit, or miss (then scored).",
            ["result"],
            registry=self.registry,
        )
        self.feedback_seconds = Histogram(
            "lorafleet_gateway_feedback_seconds",
            "From a feedback's arrival to its new version's answer.",
            registry=self.registry,
        )
        self.feedback_replayed = Counter(
            "lorafleet_gateway_feedback_replayed",
            "Feedback steps answered from an earlier step with the same idempotency key.",
            registry=self.registry,
        )
