"""The stream worker: one consumer of group `detector` scoring `readings` into `anomalies`."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson
import psycopg
import redis.exceptions
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from detector.errors import ModelNotFoundError, StoreUnavailableError
from detector.history import record_anomalies
from detector.latest import LatestVersions
from detector.metrics import WorkerMetrics
from detector.settings import Settings
from detector.store import POSTGRES_ERRORS, REDIS_ERRORS, ModelStore
from detector.stream_ops import Output, StreamOps, is_nogroup
from detector.streams import DeadLetter, Reading, event_fields, parse_reading

log = logging.getLogger(__name__)

Entry = tuple[str, dict[str, str]]

_MAX_BACKOFF = 5.0
# In burst mode, how long to wait for other consumers' pending entries before looking again.
_BURST_POLL = 0.05


def default_consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Worker:
    """Reads `readings` as one consumer of the group, scores, and commits atomically.

    Per batch: validate each entry (poison → dead letter), resolve models (latest pointer
    cached ``model_refresh_seconds``), score each (series, version) group with one vectorised
    ``StaticModel.score`` call, record anomalies in PostgreSQL (idempotent), then write events
    and dead letters and XACK the entries in one Lua script. A crash anywhere before the script
    leaves the entries pending (redelivered, nothing lost); the script skips entries that are no
    longer pending (never a duplicate event).
    """

    def __init__(
        self,
        settings: Settings,
        redis_client: Redis,
        pool: AsyncConnectionPool,
        *,
        metrics: WorkerMetrics,
        consumer: str | None = None,
        store: ModelStore | None = None,
    ) -> None:
        self.settings = settings
        self.redis = redis_client
        self.pool = pool
        self.metrics = metrics
        self.consumer = consumer or settings.stream_consumer or default_consumer_name()
        self.store = store or ModelStore(redis_client, pool, cache_size=settings.model_cache_size)
        self.latest = LatestVersions(self.store, settings.model_refresh_seconds)
        self.ops = StreamOps(
            redis_client,
            readings=settings.stream_readings,
            anomalies=settings.stream_anomalies,
            dead=settings.stream_dead,
            group=settings.stream_group,
            anomalies_maxlen=settings.stream_anomalies_maxlen,
            dead_maxlen=settings.stream_dead_maxlen,
        )
        self.heartbeat_key = f"{settings.stream_readings}:heartbeat:{self.consumer}"
        self.processed = 0
        self._stopping = False
        self._recovering = True  # first re-read our own pending entries (id 0)
        self._pending_cursor = "0"
        self._claim_cursor = "0-0"
        self._next_claim = 0.0
        self._next_maintenance = 0.0
        self._next_heartbeat = 0.0
        self._label = metrics.transport
        self._started = time.monotonic()

    def request_stop(self) -> None:
        """Finish the batch in hand, then return from ``run`` (the SIGTERM handler)."""
        self._stopping = True

    async def run(self, *, burst: bool = False) -> None:
        """Consume until ``request_stop``; with ``burst``, until the group has nothing left
        (no undelivered entry and nothing pending for any consumer)."""
        log.info("worker %s consuming %s", self.consumer, self.settings.stream_readings)
        self._started = time.monotonic()
        await self._ensure_group()
        backoff = 0.1
        while not self._stopping:
            try:
                more = await self._step(burst)
                backoff = 0.1
            except redis.exceptions.ResponseError as exc:
                if not is_nogroup(exc):
                    raise
                log.warning("consumer group vanished (FLUSHALL or a deleted stream); recreating")
                await self._ensure_group()
                self._recovering, self._pending_cursor = True, "0"
                continue
            except (*REDIS_ERRORS, StoreUnavailableError) as exc:
                log.warning("store unavailable (%s); retrying in %.1f s", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(_MAX_BACKOFF, backoff * 2)
                # The batch in hand was not acknowledged: it is still pending for us.
                self._recovering, self._pending_cursor = True, "0"
                continue
            if burst and not more:
                break
        await self._finish()

    async def _ensure_group(self) -> None:
        while True:
            try:
                if await self.ops.ensure_group():
                    log.info("created consumer group %s", self.settings.stream_group)
                return
            except REDIS_ERRORS as exc:
                if self._stopping:
                    raise
                log.warning("Redis unavailable (%s); retrying", exc)
                await asyncio.sleep(1.0)

    async def _finish(self) -> None:
        try:
            await self._maintain(force=True)
            await self.redis.delete(self.heartbeat_key)
            await self.ops.delete_consumer_if_idle(self.consumer)
        except (*REDIS_ERRORS, redis.exceptions.ResponseError) as exc:
            log.warning("could not tidy up on exit: %s", exc)
        elapsed = time.monotonic() - self._started
        log.info(
            "worker %s stopped: %d readings in %.2f s (%.0f/s)",
            self.consumer,
            self.processed,
            elapsed,
            self.processed / max(elapsed, 1e-9),
        )

    async def _step(self, burst: bool) -> bool:
        """One read-score-commit round; False when a burst run has nothing left to do."""
        await self._heartbeat()
        s = self.settings
        if self._recovering:
            entries = await self._read(self._pending_cursor, block=None)
            if entries:
                self._pending_cursor = entries[-1][0]
                await self._process(entries, redelivered=True)
                return True
            self._recovering = False
        now = time.monotonic()
        if now >= self._next_claim:
            claimed = await self._claim()
            if claimed:
                await self._process(claimed, redelivered=True)
                return True
        entries = await self._read(">", block=None if burst else s.stream_block_ms)
        if entries:
            await self._process(entries, redelivered=False)
            await self._maintain()
            return True
        await self._maintain()
        if not burst:
            return True
        if await self.ops.pending_count() == 0:
            return False
        await asyncio.sleep(_BURST_POLL)  # others' entries: wait for them, or claim them
        return True

    async def _read(self, from_id: str, *, block: int | None) -> list[Entry]:
        s = self.settings
        reply: Any = await self.redis.xreadgroup(
            s.stream_group,
            self.consumer,
            {s.stream_readings: from_id},
            count=s.stream_batch_count,
            block=block,
        )
        if not reply:
            return []
        if isinstance(reply, dict):  # RESP3
            return [e for batch in reply[s.stream_readings] for e in batch]
        return list(reply[0][1])

    async def _claim(self) -> list[Entry]:
        """Take over entries idle longer than the claim time (their consumer probably died)."""
        s = self.settings
        reply = await self.redis.xautoclaim(
            s.stream_readings,
            s.stream_group,
            self.consumer,
            s.stream_claim_idle_ms,
            start_id=self._claim_cursor,
            count=s.stream_batch_count,
        )
        cursor, entries = str(reply[0]), [e for e in reply[1] if e[0] is not None]
        if cursor in ("0-0", "0"):  # a full pass done: rest until the next interval
            self._claim_cursor = "0-0"
            self._next_claim = time.monotonic() + s.stream_claim_interval_ms / 1000
        else:
            self._claim_cursor = cursor
        if entries:
            log.info("claimed %d idle entries from other consumers", len(entries))
        return entries

    async def _process(self, entries: Sequence[Entry], *, redelivered: bool) -> None:
        started = time.perf_counter()
        outputs: dict[str, Output] = {}
        dead: list[DeadLetter] = []
        readings: list[Reading] = []
        too_many: set[str] = set()
        if redelivered:
            counts = await self.ops.delivery_counts(self.consumer, [e[0] for e in entries])
            limit = self.settings.stream_max_deliveries
            too_many = {entry_id for entry_id, n in counts.items() if n > limit}
        for entry_id, fields in entries:
            if not fields:  # deleted from the stream while pending: nothing left to score
                outputs[entry_id] = Output(entry_id)
                continue
            if entry_id in too_many:
                parsed: Reading | DeadLetter = DeadLetter(
                    entry_id,
                    "too_many_deliveries",
                    f"delivered more than {self.settings.stream_max_deliveries} times",
                    fields,
                )
            else:
                parsed = parse_reading(entry_id, fields)
            if isinstance(parsed, DeadLetter):
                dead.append(parsed)
            else:
                readings.append(parsed)
        no_model, events, unknown = await self._score(readings, outputs)
        if unknown:
            raw = dict(entries)
            dead += [DeadLetter(i, "unknown_version", why, raw[i]) for i, why in unknown]
        for letter in dead:
            outputs[letter.source_id] = Output(letter.source_id, "d", letter.to_fields())
        if events and self.settings.stream_record_postgres:
            await self._record(events)
        ordered = [outputs[entry_id] for entry_id, _ in entries]
        committed, emitted = await self.ops.commit(ordered)
        self._count(len(readings) - no_model - len(unknown), no_model, dead, emitted)
        self.processed += committed
        m, label = self.metrics, self._label
        m.batch_duration.labels(label).observe(time.perf_counter() - started)
        m.last_batch.labels(label).set(time.time())

    async def _score(
        self, readings: list[Reading], outputs: dict[str, Output]
    ) -> tuple[int, list[dict[str, str]], list[tuple[str, str]]]:
        """Score readings grouped by (series, version), filling ``outputs``. Returns (readings
        without a model, events, (entry id, why) of pinned versions that do not exist)."""
        latest = await self.latest.resolve(r.series_id for r in readings if r.version is None)
        groups: defaultdict[tuple[str, int], list[Reading]] = defaultdict(list)
        no_model = 0
        for reading in readings:
            version = latest[reading.series_id] if reading.version is None else reading.version
            if version is None:
                no_model += 1
                outputs[reading.source_id] = Output(reading.source_id)
            else:
                groups[(reading.series_id, version)].append(reading)
        detected_at = time.time()
        events: list[dict[str, str]] = []
        unknown: list[tuple[str, str]] = []
        for (series_id, version), members in groups.items():
            try:
                found = await self.store.get(series_id, version)
            except ModelNotFoundError as exc:
                for reading in members:
                    if reading.version is None:  # latest pointer raced a withdrawn fit
                        no_model += 1
                        outputs[reading.source_id] = Output(reading.source_id)
                    else:
                        unknown.append((reading.source_id, exc.detail))
                continue
            model = found.model
            values = np.fromiter((r.value for r in members), dtype=np.float64, count=len(members))
            scores = model.score(values)
            flagged = set(np.flatnonzero(scores.anomaly).tolist())
            for i, reading in enumerate(members):
                if i in flagged:
                    event = event_fields(
                        reading,
                        version=version,
                        mean=model.mean,
                        std=model.std,
                        lower=scores.lower,
                        upper=scores.upper,
                        score=float(scores.score[i]),
                        detected_at=detected_at,
                    )
                    events.append(event)
                    outputs[reading.source_id] = Output(reading.source_id, "a", event)
                else:
                    outputs[reading.source_id] = Output(reading.source_id)
        return no_model, events, unknown

    async def _record(self, events: list[dict[str, str]]) -> None:
        """Write anomalies to PostgreSQL, retrying in place while it is down: the batch stays
        unacknowledged meanwhile, and a redelivery would spend the entries' delivery budget."""
        backoff = 0.2
        while True:
            try:
                await record_anomalies(self.pool, self.settings.stream_readings, events)
                return
            except (*POSTGRES_ERRORS, psycopg.Error) as exc:
                if self._stopping:
                    raise StoreUnavailableError("postgres", str(exc)) from exc
                log.warning("PostgreSQL unavailable (%s); retrying in %.1f s", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(_MAX_BACKOFF, backoff * 2)

    def _count(self, scored: int, no_model: int, dead: list[DeadLetter], emitted: int) -> None:
        m, label = self.metrics, self._label
        m.readings.labels(label, "scored").inc(scored)
        m.readings.labels(label, "no_model").inc(no_model)
        m.readings.labels(label, "dead").inc(len(dead))
        for reason, n in Counter(letter.reason for letter in dead).items():
            m.dead_letters.labels(label, reason).inc(n)
        m.anomalies.labels("stream").inc(emitted)
        m.events_emitted.labels(label).inc(emitted)

    async def _heartbeat(self) -> None:
        now = time.monotonic()
        if now < self._next_heartbeat:
            return
        ttl = self.settings.worker_heartbeat_ttl_seconds
        self._next_heartbeat = now + max(0.5, ttl / 3)
        state = {"pid": os.getpid(), "at": time.time(), "processed": self.processed}
        await self.redis.set(self.heartbeat_key, orjson.dumps(state).decode(), ex=ttl)

    async def _maintain(self, *, force: bool = False) -> None:
        """Trim `readings` below what the groups still need, refresh the lag gauges."""
        now = time.monotonic()
        if not force and now < self._next_maintenance:
            return
        self._next_maintenance = now + self.settings.stream_trim_interval_ms / 1000
        await self.ops.trim_readings()
        self.metrics.consumer_lag.labels(self._label).set(await self.ops.lag())
        self.metrics.pending_entries.labels(self._label).set(await self.ops.pending_count())
