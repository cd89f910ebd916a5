"""Prometheus metrics of the API, on a registry passed in.

No label takes a value per series: cardinality stays bounded however many series exist.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from detector.metrics import LATENCY_BUCKETS, anomalies_counter


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
        self.anomalies = anomalies_counter(registry)
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
