"""Prometheus metrics of the stream workers (both transports), on a registry passed in.

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


def anomalies_counter(registry: CollectorRegistry) -> Counter:
    """``anomalies_detected_total{source}``: the one series the API (``rest``) and the workers
    (``stream``) both export, so a dashboard sums them."""
    return Counter(
        "anomalies_detected",
        "Anomalous readings found, by source (rest or stream).",
        ["source"],
        registry=registry,
    )


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
        self.anomalies = anomalies_counter(registry)
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
        # Silent series (docs/stream-contract.md#silent-series): counted by the worker that
        # wrote the event; the gauge is the fleet's count as of this worker's last sweep (every
        # worker reports the same number: take max, not sum).
        self.no_data_events = Counter(
            "no_data_events",
            "no_data events written: state=open when a fitted series went silent, closed when"
            " its next reading arrived.",
            ["transport", "state"],
            registry=registry,
        )
        self.series_silent = Gauge(
            "series_silent",
            "Fitted series silent now (no reading within their silence threshold), fleet-wide,"
            " as of this worker's last sweep.",
            ["transport"],
            registry=registry,
        )
        # Incidents (docs/stream-contract.md#incidents): counted by the worker whose batch
        # opened one; the gauge is the fleet's (0 or 1) as of this worker's last script call.
        self.incidents_opened = Counter(
            "incidents_opened",
            "Incidents opened: episodes of many series opening within the incident window.",
            ["transport"],
            registry=registry,
        )
        self.incidents_active = Gauge(
            "incidents_active",
            "Incidents open now, fleet-wide, as of this worker's last onsets or sweep.",
            ["transport"],
            registry=registry,
        )
        self.incidents_opened.labels(transport)
        self.incidents_active.labels(transport)
        for state in ("open", "closed"):
            self.no_data_events.labels(transport, state)
        self.series_silent.labels(transport)
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
