"""The faust app: an agent on `readings` that scores batches and produces to `anomalies`."""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import faust
import psycopg
from faust.types import EventT
from prometheus_client import start_http_server

from detector.errors import POSTGRES_ERRORS, REDIS_ERRORS, StoreUnavailableError
from detector.metrics import WorkerMetrics
from detector.scoring import score_batch
from detector.settings import Settings
from detector.store.connections import apply_schema, postgres_pool, redis_client
from detector.store.history import record_anomalies
from detector.store.latest import LatestVersions
from detector.store.models import ModelStore
from detector.wire.kafka import dead_value, event_value, fields_from_json, source_id
from detector.wire.readings import DeadLetter, RawEntry, flat_fields, parse_batch

log = logging.getLogger(__name__)

_MAX_BACKOFF = 5.0
# A crash we do not understand: exit at once, so no offset past the batch is ever committed
# (faust acks a `take_events` batch when the generator is closed, even by an exception).
_EXIT_ON_BUG = 70


def create_app(settings: Settings, metrics: WorkerMetrics) -> faust.App:
    """The faust app (group = ``kafka_app_id``); its agent runs one ``KafkaScorer``."""
    s = settings
    app = faust.App(
        s.kafka_app_id,
        broker=s.kafka_bootstrap,
        store="memory://",  # no tables: all state is the model store and the offsets
        autodiscover=False,
        web_enabled=False,  # Prometheus metrics have their own port instead
        # No tables, so nothing is written here; one directory per app id, not per process.
        datadir=str(Path(tempfile.gettempdir()) / f"faust-{s.kafka_app_id}"),
        processing_guarantee=s.kafka_processing_guarantee,
        topic_partitions=s.kafka_partitions,
        topic_disable_leader=True,  # no tables or leader-only work: skip the leader topic
        consumer_auto_offset_reset="earliest",  # readings sent before any worker are scored
        broker_session_timeout=s.kafka_session_timeout_seconds,
        broker_heartbeat_interval=min(3.0, s.kafka_session_timeout_seconds / 3),
    )
    raw: dict[str, Any] = {
        "key_type": bytes,
        "value_type": bytes,
        "key_serializer": "raw",
        "value_serializer": "raw",
        "partitions": s.kafka_partitions,
    }
    readings = app.topic(s.kafka_readings_topic, **raw)
    anomalies = app.topic(s.kafka_anomalies_topic, **raw)
    dead = app.topic(s.kafka_dead_topic, **raw)
    positions: dict[tuple[str, int], int] = {}

    @app.agent(readings, name="detect")
    async def detect(stream: faust.StreamT[bytes]) -> None:
        scorer = KafkaScorer(s, metrics, anomalies, dead, positions)
        await scorer.open()
        try:
            async for batch in cast(faust.Stream[bytes], stream).take_events(
                s.kafka_batch_count, within=s.kafka_batch_within_seconds
            ):
                await scorer.process_safely(batch)
        finally:
            await scorer.close()

    async def serve_metrics() -> None:
        if s.kafka_metrics_port:
            start_http_server(s.kafka_metrics_port, registry=metrics.registry)
            log.info("worker metrics on http://0.0.0.0:%d/metrics", s.kafka_metrics_port)

    async def measure_lag() -> None:
        metrics.consumer_lag.labels(metrics.transport).set(
            _lag(app, s.kafka_readings_topic, positions)
        )

    # Registered by call, not as decorators: faust's decorators are untyped.
    app.task(serve_metrics)
    app.timer(interval=5.0)(measure_lag)
    return app


def _lag(app: faust.App, topic: str, positions: dict[tuple[str, int], int]) -> int:
    """Records of our partitions not yet processed: high-water mark minus our position."""
    lag = 0
    for tp in app.consumer.assignment():
        if tp.topic != topic:
            continue
        try:
            highwater = app.consumer.highwater(tp)
        except (KeyError, AssertionError, AttributeError):  # not fetched from yet
            continue
        if highwater is not None:
            lag += max(0, int(highwater) - positions.get((tp.topic, tp.partition), 0))
    return lag


class KafkaScorer:
    """Scores one batch of records with the shared scorer, then produces and awaits its
    events and dead letters; only then does the agent ask for the next batch, which is when
    faust acknowledges this one (offsets are committed from acknowledged records only)."""

    def __init__(
        self,
        settings: Settings,
        metrics: WorkerMetrics,
        anomalies: faust.TopicT,
        dead: faust.TopicT,
        positions: dict[tuple[str, int], int],
    ) -> None:
        self.settings = settings
        # Next offset to process per (topic, partition), read by the lag gauge's timer.
        self.positions = positions
        self.metrics = metrics
        self.anomalies = anomalies
        self.dead = dead
        self.redis = redis_client(settings)
        self.pool = postgres_pool(settings)
        self.store = ModelStore(self.redis, self.pool, cache_size=settings.model_cache_size)
        self.latest = LatestVersions(self.store, settings.model_refresh_seconds)
        self.processed = 0

    async def open(self) -> None:
        await self.pool.open(wait=False)
        try:
            await apply_schema(self.pool)
        except POSTGRES_ERRORS as exc:
            log.warning("PostgreSQL not reachable at start-up: %s", exc)

    async def close(self) -> None:
        await self.pool.close()
        await self.redis.aclose()

    async def process_safely(self, batch: Sequence[EventT[bytes]]) -> None:
        """``process``, retried while a store or the broker is unavailable."""
        backoff = 0.2
        while True:
            try:
                await self.process(batch)
                return
            except (*REDIS_ERRORS, *POSTGRES_ERRORS, psycopg.Error, StoreUnavailableError) as exc:
                log.warning("store unavailable (%s); retrying in %.1f s", exc, backoff)
            except Exception:
                log.critical("cannot process a batch; exiting uncommitted", exc_info=True)
                logging.shutdown()
                os._exit(_EXIT_ON_BUG)
            await asyncio.sleep(backoff)
            backoff = min(_MAX_BACKOFF, backoff * 2)

    async def process(self, batch: Sequence[EventT[bytes]]) -> None:
        started = time.perf_counter()
        dead: list[DeadLetter] = []
        entries: list[RawEntry] = []
        raw: dict[str, dict[str, str]] = {}
        for event in batch:
            message = event.message
            sid = source_id(message.topic, message.partition, message.offset)
            fields = fields_from_json(message.value)
            if fields is None:
                dead.append(DeadLetter(sid, "missing_field", "value is not a JSON object", {}))
            elif not fields:  # `{}`: parse_batch would take it for a deleted Redis entry
                dead.append(DeadLetter(sid, "missing_field", "value has no fields", {}))
            else:
                raw[sid] = fields
                entries.append((sid, flat_fields(fields)))
        # The Redis worker's own validation and scoring, column-wise over the batch.
        readings, invalid = parse_batch(entries)
        dead += invalid
        scored = await score_batch(readings, self.store, self.latest)
        dead += [DeadLetter(i, "unknown_version", why, raw[i]) for i, why in scored.unknown]
        events = list(scored.events.values())
        if events and self.settings.stream_record_postgres:
            # Idempotent on (source, source_id): a redelivered record is not stored twice.
            await record_anomalies(self.pool, f"kafka:{self.anomalies.get_topic_name()}", events)
        sent = [
            await self.anomalies.send(
                key=found["series_id"].encode(), value=event_value(found), force=True
            )
            for found in events
        ]
        sent += [
            await self.dead.send(
                key=letter.fields.get("series_id", "").encode() or None,
                value=dead_value(letter.to_fields()),
                force=True,
            )
            for letter in dead
        ]
        await asyncio.gather(*sent)  # every record acknowledged by the broker
        for event in batch:
            message = event.message
            self.positions[(message.topic, message.partition)] = message.offset + 1
        self.processed += len(batch)
        scored_count = len(readings) - scored.no_model - len(scored.unknown)
        m, label = self.metrics, self.metrics.transport
        m.count_batch(scored_count, scored.no_model, [d.reason for d in dead], len(events))
        m.batch_duration.labels(label).observe(time.perf_counter() - started)
        m.last_batch.labels(label).set(time.time())
