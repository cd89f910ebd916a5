"""The faust app: an agent on `readings` that scores batches and produces to `anomalies`."""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import faust
import psycopg
from faust.types import EventT
from prometheus_client import start_http_server

from detector.errors import POSTGRES_ERRORS, is_unavailable
from detector.kinds.registry import stateful_kind
from detector.metrics import WorkerMetrics
from detector.pipeline import Outcome, Pipeline, merge_outcomes
from detector.retry import retry_while
from detector.settings import Settings
from detector.shards import kafka_shards, shard_of
from detector.state.adjustments import Adjustments
from detector.state.series import Acknowledged, SeriesStates
from detector.state.silence import silence_watch
from detector.store.connections import (
    apply_schema,
    postgres_pool,
    prepare_clients,
    redis_client,
)
from detector.store.models import ModelStore
from detector.transports.kafka.incidents import KafkaIncidentSweep, kafka_incident_tracker
from detector.transports.kafka.produce import send_events
from detector.transports.kafka.silence import KafkaSilenceSweep
from detector.wire.kafka import dead_value, fields_from_json, source_id
from detector.wire.readings import DeadLetter, RawEntry, flat_fields

log = logging.getLogger(__name__)

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
        scorer = KafkaScorer(s, metrics, anomalies, dead, positions, committed=_committed(app))
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
    if s.silence_cadences > 0:  # silent series: claimed in Redis, produced to `anomalies`
        app.timer(interval=s.silence_sweep_seconds)(KafkaSilenceSweep(s, metrics, anomalies).sweep)
    if s.incident_min_series > 0:  # incidents: quiet ones closed, orphaned events taken over
        incidents = KafkaIncidentSweep(s, metrics, anomalies)
        app.timer(interval=s.incident_sweep_seconds)(incidents.sweep)
    return app


def _committed(app: faust.App) -> Callable[[], Mapping[Any, int | None]]:
    """The consumer's committed offsets per partition (faust keeps them as it commits)."""

    def read() -> Mapping[Any, int | None]:
        return dict(getattr(app.consumer, "_committed_offset", None) or {})

    return read


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
    """Runs the shared pipeline (``detector.pipeline``) over one batch of records, then
    produces and awaits its events and dead letters; only then does the agent ask for the
    next batch, which is when faust acknowledges this one (offsets are committed from
    acknowledged records only). Stateful kinds and episodes keep their state in Redis, as on
    the Redis transport: it is keyed by series and source id, so it is correct whichever
    worker a rebalance hands a partition to, and a redelivered record is recognised."""

    def __init__(
        self,
        settings: Settings,
        metrics: WorkerMetrics,
        anomalies: faust.TopicT,
        dead: faust.TopicT,
        positions: dict[tuple[str, int], int],
        committed: Callable[[], Mapping[Any, int | None]] | None = None,
    ) -> None:
        self.settings = settings
        # Next offset to process per (topic, partition), read by the lag gauge's timer.
        self.positions = positions
        self.committed = committed
        self.metrics = metrics
        self.anomalies = anomalies
        self.dead = dead
        self.redis = redis_client(settings)
        self.pool = postgres_pool(settings)
        store = ModelStore(self.redis, self.pool, cache_size=settings.model_cache_size)
        source = f"kafka:{anomalies.get_topic_name()}"
        # On Redis Cluster a batch runs a shard at a time (``kafka_shards``); one shard else.
        shards = kafka_shards(settings)
        adjustments = Adjustments(self.redis, settings.model_refresh_seconds)
        tracker = kafka_incident_tracker(settings, self.redis, shards, source)
        self.pipelines = [
            Pipeline(
                settings,
                store,
                source=source,
                metrics=metrics,
                streams=SeriesStates(
                    self.redis,
                    store,
                    namespace=shard.namespace,
                    adjustments=adjustments,
                    lateness=settings.lateness_seconds,
                ),
                silence=silence_watch(
                    settings, self.redis, store, output=shard.anomalies, mode="lease"
                ),
                incidents=tracker,
                namespace=shard.namespace,
            )
            for shard in shards
        ]
        self.pipeline = self.pipelines[0]
        self.processed = 0

    async def open(self) -> None:
        if stateful_kind(self.settings.default_kind) is not None:
            self.pipeline.streams.prepare()  # what a fit without options makes: load its fold
        await prepare_clients(self.redis)
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
        try:
            await retry_while(
                lambda: self.process(batch),
                lambda exc: is_unavailable(exc) or isinstance(exc, psycopg.Error),
                log=log,
                what="store unavailable",
                first=0.2,
            )
        except Exception:
            log.critical("cannot process a batch; exiting uncommitted", exc_info=True)
            logging.shutdown()
            os._exit(_EXIT_ON_BUG)

    async def process(self, batch: Sequence[EventT[bytes]]) -> None:
        dead: list[DeadLetter] = []
        entries: list[RawEntry] = []
        for event in batch:
            message = event.message
            sid = source_id(message.topic, message.partition, message.offset)
            fields = fields_from_json(message.value)
            if fields is None:
                dead.append(DeadLetter(sid, "missing_field", "value is not a JSON object", {}))
            elif not fields:  # `{}`: parse_batch would take it for a deleted Redis entry
                dead.append(DeadLetter(sid, "missing_field", "value has no fields", {}))
            else:
                entries.append((sid, flat_fields(fields)))
        outcome = await self._run(entries, dead)
        sent = await send_events(self.anomalies, outcome.events.values(), "series_id")
        # no_data events that readings of silent series closed
        sent += await send_events(self.anomalies, [n for _, n in outcome.notices], "series_id")
        # incidents these readings' onsets opened or closed
        sent += await send_events(self.anomalies, outcome.incidents, "incident_id")
        sent += [
            await self.dead.send(
                key=letter.fields.get("series_id", "").encode() or None,
                value=dead_value(letter.to_fields()),
                force=True,
            )
            for letter in outcome.dead
        ]
        await asyncio.gather(*sent)  # every record acknowledged by the broker
        await self.pipeline.incidents_delivered(outcome.incidents)
        for event in batch:
            message = event.message
            self.positions[(message.topic, message.partition)] = message.offset + 1
        self.processed += len(batch)
        self.pipeline.count(outcome, len(outcome.events), len(outcome.notices))

    async def _run(self, entries: list[RawEntry], dead: list[DeadLetter]) -> Outcome:
        """The shared pipeline over the batch: at once on one Redis; on a cluster a shard's
        readings at a time (a series' readings stay in order within its shard), the
        outcomes merged in shard order."""
        acknowledged = self._acknowledged()
        count = len(self.pipelines)
        if count == 1:
            return await self.pipeline.run(entries, dead=dead, acknowledged=acknowledged)
        parts: list[list[RawEntry]] = [[] for _ in self.pipelines]
        for entry in entries:
            parts[shard_of(_series_of(entry[1]), count)].append(entry)
        outcomes = [
            await pipeline.run(part, dead=dead if k == 0 else (), acknowledged=acknowledged)
            for k, (pipeline, part) in enumerate(zip(self.pipelines, parts, strict=True))
            if part or k == 0
        ]
        return merge_outcomes(outcomes)

    def _acknowledged(self) -> Acknowledged | None:
        """Records below their partition's committed offset are never delivered again."""
        if self.committed is None:
            return None
        committed = {
            (getattr(tp, "topic", None), getattr(tp, "partition", None)): offset
            for tp, offset in self.committed().items()
            if offset is not None
        }

        def done(source: str) -> bool:
            topic, _, rest = source.rpartition("/")
            topic, _, partition = topic.rpartition("/")
            try:
                offset = committed.get((topic, int(partition)))
                return offset is not None and int(rest) < offset
            except ValueError:
                return False

        return done


def _series_of(flat: Sequence[str | bytes] | None) -> str:
    """A raw entry's series id (flat fields: name, value, ...); "" when it has none (the
    pipeline turns such an entry into a dead letter, whichever shard it runs in)."""
    if flat:
        for i in range(0, len(flat) - 1, 2):
            if flat[i] == "series_id":
                value = flat[i + 1]
                return value if isinstance(value, str) else value.decode(errors="replace")
    return ""
