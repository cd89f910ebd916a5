"""The stream worker: one consumer of group `detector` scoring `readings` into `anomalies`."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass

import orjson
import psycopg
import redis.exceptions
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from detector.errors import (
    POSTGRES_ERRORS,
    REDIS_ERRORS,
    REDIS_FAILURES,
    StoreUnavailableError,
    redis_unavailable,
)
from detector.metrics import WorkerMetrics
from detector.redis_keys import heartbeat_key
from detector.scoring import score_batch
from detector.settings import Settings
from detector.state.episodes import EpisodeTracker
from detector.state.multiscale import MultiscaleStreams
from detector.store.history import record_anomalies
from detector.store.latest import LatestVersions
from detector.store.models import ModelStore
from detector.transports.redis.consumer_group import Output, StreamOps, is_nogroup
from detector.wire.readings import DeadLetter, RawEntry, as_fields, parse_batch

log = logging.getLogger(__name__)

_MAX_BACKOFF = 5.0
# In burst mode, how long to wait for other consumers' pending entries before looking again.
_BURST_POLL = 0.05


@dataclass(frozen=True, slots=True)
class _Prepared:
    """A scored batch, ready to record and commit."""

    ids: list[str]
    outputs: list[Output]
    events: list[dict[str, str]]
    scored: int
    no_model: int
    dead: list[DeadLetter]
    started: float


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
        # Per-series state of the multiscale kind (compare-and-set in Redis, see the module).
        self.streams = MultiscaleStreams(
            redis_client,
            self.store,
            readings_stream=settings.stream_readings,
            group=settings.stream_group,
        )
        self.episodes = (
            EpisodeTracker(
                redis_client,
                quiet_seconds=settings.episode_quiet_seconds,
                history=settings.episode_history,
            )
            if settings.episodes
            else None
        )
        self.ops = StreamOps(
            redis_client,
            readings=settings.stream_readings,
            anomalies=settings.stream_anomalies,
            dead=settings.stream_dead,
            group=settings.stream_group,
            anomalies_maxlen=settings.stream_anomalies_maxlen,
            dead_maxlen=settings.stream_dead_maxlen,
        )
        self.heartbeat_key = heartbeat_key(settings.stream_readings, self.consumer)
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
        self._prefetched: asyncio.Task[list[RawEntry]] | None = None

    def request_stop(self) -> None:
        """Finish the batch in hand, then return from ``run`` (the SIGTERM handler)."""
        self._stopping = True

    async def run(self, *, burst: bool = False) -> None:
        """Consume until ``request_stop``; with ``burst``, until the group has nothing left
        (no undelivered entry and nothing pending for any consumer)."""
        log.info("worker %s consuming %s", self.consumer, self.settings.stream_readings)
        self._started = time.monotonic()
        await self._ensure_group()
        try:
            await self._consume(burst)
        except asyncio.CancelledError:
            # Cancelled from outside (not a SIGTERM): let the read-ahead end first (a
            # non-blocking read, milliseconds), so it is not cut off mid-reply on a connection
            # the caller is about to close.
            await self._drop_inflight()
            raise
        await self._finish_prefetched()
        await self._finish()

    async def _consume(self, burst: bool) -> None:
        backoff = 0.1
        while not self._stopping:
            try:
                more = await self._step(burst)
                backoff = 0.1
            except (*REDIS_FAILURES, StoreUnavailableError) as exc:
                await self._drop_inflight()
                if isinstance(exc, redis.exceptions.ResponseError) and is_nogroup(exc):
                    log.warning(
                        "consumer group vanished (FLUSHALL or a deleted stream); recreating"
                    )
                    await self._ensure_group()
                    self._recovering, self._pending_cursor = True, "0"
                    continue
                if not isinstance(exc, StoreUnavailableError) and not redis_unavailable(exc):
                    raise
                log.warning("store unavailable (%s); retrying in %.1f s", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(_MAX_BACKOFF, backoff * 2)
                # The batch in hand was not acknowledged: it is still pending for us.
                self._recovering, self._pending_cursor = True, "0"
                continue
            if burst and not more:
                break

    async def _drop_inflight(self) -> None:
        """After an error, let the read-ahead end (cancelling it mid-reply would strand its
        connection) and forget it: what it read is still pending for us and comes back with
        the re-read of our pending entries (id 0)."""
        task, self._prefetched = self._prefetched, None
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)

    async def _finish_prefetched(self) -> None:
        """On stop, the read-ahead batch is in hand too: finish it (or leave it pending)."""
        try:
            if self._prefetched is None:
                return
            entries = await self._prefetched
            self._prefetched = None
            if entries:
                await self._process(entries, redelivered=False)
        except (*REDIS_ERRORS, StoreUnavailableError, redis.exceptions.ResponseError) as exc:
            log.warning("left the read-ahead batch pending: %s", exc)

    async def _ensure_group(self) -> None:
        while True:
            try:
                if await self.ops.ensure_group():
                    log.info("created consumer group %s", self.settings.stream_group)
                return
            except REDIS_FAILURES as exc:
                if self._stopping or not redis_unavailable(exc):
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
        entries = await self._next_batch(block=None if burst else s.stream_block_ms)
        if entries:
            if len(entries) >= s.stream_batch_count and not self._stopping:
                # A full batch, so more are probably waiting: ask for them now. Redis serves
                # the read (and redis-py parses it, at our awaits) while this batch is scored
                # and committed; the batches still commit one after the other, in order.
                self._prefetched = asyncio.create_task(self._read(">", block=None))
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

    async def _next_batch(self, *, block: int | None) -> list[RawEntry]:
        """New entries: the read-ahead's if there is one, else a fresh read."""
        if self._prefetched is not None:
            # Shielded: were we cancelled meanwhile, the read must not be cut off mid-reply;
            # it stays referenced, so the cancellation handler waits for it.
            entries = await asyncio.shield(self._prefetched)
            self._prefetched = None
            if entries:
                return entries
        return await self._read(">", block=block)

    async def _read(self, from_id: str, *, block: int | None) -> list[RawEntry]:
        return await self.ops.read(
            self.consumer, from_id, self.settings.stream_batch_count, block=block
        )

    async def _claim(self) -> list[RawEntry]:
        """Take over entries idle longer than the claim time (their consumer probably died)."""
        s = self.settings
        cursor, entries = await self.ops.claim(
            self.consumer, s.stream_claim_idle_ms, self._claim_cursor, s.stream_batch_count
        )
        if cursor in ("0-0", "0"):  # a full pass done: rest until the next interval
            self._claim_cursor = "0-0"
            self._next_claim = time.monotonic() + s.stream_claim_interval_ms / 1000
        else:
            self._claim_cursor = cursor
        if entries:
            log.info("claimed %d idle entries from other consumers", len(entries))
        return entries

    async def _process(self, entries: Sequence[RawEntry], *, redelivered: bool) -> None:
        """Prepare, record and commit one batch."""
        await self._complete(await self._prepare(entries, redelivered=redelivered))

    async def _prepare(self, entries: Sequence[RawEntry], *, redelivered: bool) -> _Prepared:
        """Validate the batch column-wise (poison → dead letter) and score it in one go."""
        started = time.perf_counter()
        dead: list[DeadLetter] = []
        entries_left: Sequence[RawEntry] = entries
        if redelivered:
            counts = await self.ops.delivery_counts(self.consumer, [e[0] for e in entries])
            limit = self.settings.stream_max_deliveries
            too_many = {entry_id for entry_id, n in counts.items() if n > limit}
            if too_many:
                why = f"delivered more than {limit} times"
                dead += [
                    DeadLetter(i, "too_many_deliveries", why, as_fields(f))
                    for i, f in entries
                    if i in too_many and f
                ]
                entries_left = [e for e in entries if e[0] not in too_many]
        batch, invalid = parse_batch(entries_left)
        dead += invalid
        scored = await score_batch(batch, self.store, self.latest, self.streams)
        if scored.opened:  # the multiscale kind's own alerts (their events carry episodes)
            self.metrics.episodes_opened.labels(self.settings.stream_readings).inc(scored.opened)
        if self.episodes is not None and scored.events:
            # Counted here, once: a redelivered opener is recognised by the script.
            opened = await self.episodes.assign(scored.events)
            self.metrics.episodes_opened.labels(self.settings.stream_readings).inc(opened)
        if scored.unknown:
            raw = dict(entries)
            dead += [
                DeadLetter(i, "unknown_version", why, as_fields(raw[i]))
                for i, why in scored.unknown
            ]
        outputs = {i: Output(i, "a", event) for i, event in scored.events.items()}
        for letter in dead:
            outputs[letter.source_id] = Output(letter.source_id, "d", letter.to_fields())
        ids = [entry_id for entry_id, _ in entries]
        return _Prepared(
            ids=ids,
            outputs=[outputs[i] for i in ids if i in outputs] if outputs else [],
            events=list(scored.events.values()),
            scored=len(batch) - scored.no_model - len(scored.unknown),
            no_model=scored.no_model,
            dead=dead,
            started=started,
        )

    async def _complete(self, prepared: _Prepared) -> None:
        """Record the batch's anomalies in PostgreSQL, then write its events and dead letters
        and acknowledge it in one atomic script."""
        if prepared.events and self.settings.stream_record_postgres:
            await self._record(prepared.events)
        committed, emitted = await self.ops.commit(prepared.ids, prepared.outputs)
        self._count(prepared.scored, prepared.no_model, prepared.dead, emitted)
        self.processed += committed
        m, label = self.metrics, self._label
        m.batch_duration.labels(label).observe(time.perf_counter() - prepared.started)
        m.last_batch.labels(label).set(time.time())

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
        self.metrics.count_batch(scored, no_model, [letter.reason for letter in dead], emitted)

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
