"""The server's Prometheus metrics (``GET /metrics``), in a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from dami_jax.engine.engine import Engine

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)


class Metrics:
    """Queue depth, busy slots, generated tokens, requests by outcome, time to first token and
    request latency."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.queue_depth = Gauge("dami_queue_depth", "Requests waiting for a slot", registry=self.registry)
        self.busy_slots = Gauge("dami_busy_slots", "Slots serving a request", registry=self.registry)
        self.slots = Gauge("dami_slots", "Slots of the engine", registry=self.registry)
        self.kv_bytes = Gauge("dami_kv_cache_bytes", "KV cache bytes: allocated for every slot, or in use by the busy slots; "
                              "on the device or in host memory (TailorKV's prompt stores)", ["memory", "state"],
                              registry=self.registry)  # fmt: skip
        self.generated_tokens = Counter("dami_generated_tokens", "Tokens generated for requests", registry=self.registry)
        self.requests = Counter("dami_requests", "Requests answered, by outcome", ["outcome"], registry=self.registry)
        self.ttft = Histogram("dami_time_to_first_token_seconds", "From arrival to the first generated token",
                              buckets=LATENCY_BUCKETS, registry=self.registry)  # fmt: skip
        self.latency = Histogram("dami_request_latency_seconds", "From arrival to the last token",
                                 buckets=LATENCY_BUCKETS, registry=self.registry)  # fmt: skip

    def started(self, engine: Engine) -> None:
        """Gauges fixed for the engine's life."""
        self.slots.set(engine.slots)
        for memory, per_slot in zip(("device", "host"), engine.kv_bytes_per_slot):
            self.kv_bytes.labels(memory=memory, state="allocated").set(per_slot * engine.slots)
        self.after_step(engine)

    def after_step(self, engine: Engine) -> None:
        """Gauges from the engine (called on its thread after every step)."""
        self.queue_depth.set(engine.waiting)
        self.busy_slots.set(engine.busy_slots)
        for memory, per_slot in zip(("device", "host"), engine.kv_bytes_per_slot):
            self.kv_bytes.labels(memory=memory, state="in_use").set(per_slot * engine.busy_slots)
