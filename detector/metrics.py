"""Prometheus metrics of the API and the stream worker, each on a registry passed in.

No label takes a value per series: cardinality stays bounded however many series exist.
The API runs one process per container (docs/operations.md), so no multiprocess mode is needed.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Sub-millisecond buckets: a cached prediction takes well under a millisecond.
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)


class ApiMetrics:
    """Everything the API process exports on /metrics."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.train_requests = Counter(
            "train_requests", "Fit requests, by outcome.", ["outcome"], registry=registry
        )
        self.predict_requests = Counter(
            "predict_requests",
            "Prediction requests (single and batch), by outcome.",
            ["outcome"],
            registry=registry,
        )
        self.train_duration = Histogram(
            "train_duration_seconds",
            "Time to validate, fit and store a model.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.predict_duration = Histogram(
            "predict_duration_seconds",
            "Time to answer a prediction request.",
            ["kind"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.predicted_points = Counter(
            "predicted_points",
            "Points scored over REST (a batch counts each point).",
            registry=registry,
        )
        self.anomalies = Counter(
            "anomalies_detected",
            "Anomalous readings found, by source (rest or stream).",
            ["source"],
            registry=registry,
        )
        self.request_errors = Counter(
            "request_errors",
            "Requests answered with an error, by kind.",
            ["kind"],
            registry=registry,
        )
        self.http_requests = Counter(
            "http_requests",
            "HTTP requests by route template, method and status.",
            ["route", "method", "status"],
            registry=registry,
        )
        self.http_duration = Histogram(
            "http_request_duration_seconds",
            "HTTP request latency by route template.",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.models_stored = Gauge(
            "models_stored",
            "Model versions stored (refreshed on fits and health checks).",
            registry=registry,
        )
        self.series_stored = Gauge(
            "series_stored", "Distinct series with at least one model.", registry=registry
        )
        self.dependency_up = Gauge(
            "dependency_up",
            "1 when the dependency answered the last health check.",
            ["dependency"],
            registry=registry,
        )
        # Pre-bound children for the hot path (a labels() lookup costs a lock and a dict).
        self.predict_ok = self.predict_requests.labels("ok")
        self.predict_single_duration = self.predict_duration.labels("single")
        self.rest_anomalies = self.anomalies.labels("rest")
        for outcome in ("ok", "invalid", "not_found", "too_large", "unavailable"):
            self.train_requests.labels(outcome)
            self.predict_requests.labels(outcome)
        for source in ("rest", "stream"):
            self.anomalies.labels(source)


class WorkerMetrics:
    """Everything a stream worker exports on its own /metrics port (names fixed: dashboards)."""

    def __init__(self, registry: CollectorRegistry, *, transport: str = "redis") -> None:
        self.registry = registry
        self.transport = transport
        self.readings = Counter(
            "stream_readings",
            "Readings taken off the stream, by outcome (scored, no_model, dead).",
            ["transport", "outcome"],
            registry=registry,
        )
        self.anomalies = Counter(
            "anomalies_detected",
            "Anomalous readings found, by source (rest or stream).",
            ["source"],
            registry=registry,
        )
        self.dead_letters = Counter(
            "stream_dead_letters",
            "Readings sent to the dead-letter stream, by reason.",
            ["transport", "reason"],
            registry=registry,
        )
        self.consumer_lag = Gauge(
            "stream_consumer_lag",
            "Entries not yet delivered to the consumer group.",
            ["transport"],
            registry=registry,
        )
        self.pending_entries = Gauge(
            "stream_pending_entries",
            "Entries delivered to the group but not yet acknowledged.",
            ["transport"],
            registry=registry,
        )
        self.batch_duration = Histogram(
            "stream_batch_duration_seconds",
            "Time to score and commit one batch.",
            ["transport"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.events_emitted = Counter(
            "stream_events_emitted",
            "Anomaly events written to the output stream.",
            ["transport"],
            registry=registry,
        )
        self.last_batch = Gauge(
            "worker_last_batch_timestamp_seconds",
            "Unix time the worker last committed a batch.",
            ["transport"],
            registry=registry,
        )
        self.episodes_opened = Counter(
            "episodes_opened",
            "Anomaly episodes opened (one onset each), by source stream.",
            ["source"],
            registry=registry,
        )
        for outcome in ("scored", "no_model", "dead"):
            self.readings.labels(transport, outcome)
        self.anomalies.labels("stream")
        self.consumer_lag.labels(transport)
        self.pending_entries.labels(transport)
        self.batch_duration.labels(transport)
        self.events_emitted.labels(transport)
        self.last_batch.labels(transport)

    def count_batch(
        self, scored: int, no_model: int, dead_reasons: Iterable[str], emitted: int
    ) -> None:
        """Count one committed batch's outcomes (the same for every transport)."""
        reasons = Tally(dead_reasons)
        t = self.transport
        self.readings.labels(t, "scored").inc(scored)
        self.readings.labels(t, "no_model").inc(no_model)
        self.readings.labels(t, "dead").inc(sum(reasons.values()))
        for reason, n in reasons.items():
            self.dead_letters.labels(t, reason).inc(n)
        self.anomalies.labels("stream").inc(emitted)
        self.events_emitted.labels(t).inc(emitted)
