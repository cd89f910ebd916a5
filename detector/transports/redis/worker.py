"""The stream worker: one consumer of group `detector` scoring `readings` into `anomalies`."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import redis.exceptions
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from detector.errors import (
    REDIS_ERRORS,
    REDIS_FAILURES,
    StoreUnavailableError,
    is_unavailable,
    redis_unavailable,
)
from detector.kinds.registry import stateful_kind
from detector.metrics import WorkerMetrics
from detector.pipeline import Outcome, Pipeline
from detector.redis_keys import silence_key
from detector.retry import Backoff, retry_while
from detector.settings import Settings
from detector.shards import Shard, shard, shards
from detector.state.adjustments import Adjustments
from detector.state.incidents import IncidentTracker, incident_tracker
from detector.state.series import SeriesStates
from detector.state.silence import silence_watch
from detector.store.connections import (
    prepare_clients,
    refuse_unsharded_cluster,
    reply_twin,
    reread_layout,
)
from detector.store.models import ModelStore
from detector.transports.redis.consumer_group import Output, StreamOps, is_nogroup
from detector.transports.redis.health import clear_health, record_health
from detector.wire.readings import DeadLetter, RawEntry, as_fields

log = logging.getLogger(__name__)

T = TypeVar("T")

# How many times a suspect entry may be in hand alone without finishing (see _process_suspect).
SUSPECT_ATTEMPTS = 2

# In burst mode, how long to wait for other consumers' pending entries before looking again.
_BURST_POLL = 0.05


def default_consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Worker:
    """Reads one shard's `readings` as one consumer of the group, scores, and commits
    atomically (one shard, the settings' own streams, unless STREAM_SHARDS is above 1: see
    ``workers``, which builds one a shard sharing one model store and incident tracker).

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
        shard: Shard | None = None,
        incidents: IncidentTracker | bool | None = True,
        raw: Redis | None = None,
    ) -> None:
        refuse_unsharded_cluster(settings)
        self.shard = shard = shard or _first_shard(settings)
        self.settings = settings
        self.redis = redis_client
        self.pool = pool
        self.metrics = metrics
        self.consumer = consumer or settings.stream_consumer or default_consumer_name()
        self.store = store or ModelStore(redis_client, pool, cache_size=settings.model_cache_size)
        self.pipeline = Pipeline(
            settings,
            self.store,
            source=shard.readings,
            metrics=metrics,
            # Per-series state of stateful kinds (compare-and-set in Redis, see the module);
            # the group's oldest pending entry bounds its redelivery bookkeeping.
            streams=SeriesStates(
                redis_client,
                self.store,
                readings_stream=shard.readings,
                group=settings.stream_group,
                namespace=shard.namespace,
                adjustments=Adjustments(redis_client, settings.model_refresh_seconds),
                lateness=settings.lateness_seconds,
                flush_after=settings.lateness_flush_seconds,
            ),
            stopping=lambda: self._stopping,
            silence=silence_watch(settings, redis_client, self.store, output=shard.anomalies),
            incidents=(
                incident_tracker(settings, redis_client) if incidents is True else incidents or None
            ),
            namespace=shard.namespace,
        )
        self.streams = self.pipeline.streams
        self.ops = StreamOps(
            redis_client,
            readings=shard.readings,
            anomalies=shard.anomalies,
            dead=shard.dead,
            group=settings.stream_group,
            anomalies_maxlen=settings.stream_anomalies_maxlen,
            dead_maxlen=settings.stream_dead_maxlen,
            raw=raw if raw is not None else reply_twin(settings, redis_client),
        )
        self.processed = 0
        self._stopping = False
        self._recovering = True  # first re-read our own pending entries (id 0)
        self._pending_cursor = "0"
        self._claim_cursor = "0-0"
        self._next_claim = 0.0
        self._next_maintenance = 0.0
        self._next_heartbeat = 0.0
        self._next_sweep = 0.0
        self._next_incident_sweep = 0.0
        self._next_flush = 0.0
        self._label = metrics.transport
        self._started = time.monotonic()
        self._prefetched: asyncio.Task[list[RawEntry]] | None = None
        # The workers of one process, one a shard (``workers``): the first records the
        # process' heartbeat and gauges and sweeps the incidents for all of them.
        self.group: list[Worker] = [self]
        self.silent = 0  # series of this shard silent at the last sweep
        self.lag = self.pending = 0  # the shard's at the last maintenance

    def request_stop(self) -> None:
        """Finish the batch in hand, then return from ``run`` (the SIGTERM handler)."""
        self._stopping = True

    async def run(self, *, burst: bool = False) -> None:
        """Consume until ``request_stop``; with ``burst``, until the group has nothing left
        (no undelivered entry and nothing pending for any consumer)."""
        log.info("worker %s consuming %s", self.consumer, self.shard.readings)
        self._started = time.monotonic()
        if stateful_kind(self.settings.default_kind) is not None:
            self.streams.prepare()  # what a fit without options makes: load its fold now
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
        backoff = Backoff()
        while not self._stopping:
            try:
                more = await self._step(burst)
                backoff.reset()
            except (*REDIS_FAILURES, StoreUnavailableError, AttributeError) as exc:
                # (AttributeError: only redis-py's torn connection, ``errors.torn_connection``)
                await self._drop_inflight()
                if isinstance(exc, redis.exceptions.ResponseError) and is_nogroup(exc):
                    log.warning(
                        "consumer group vanished (FLUSHALL or a deleted stream); recreating"
                    )
                    await self._ensure_group()
                    self._recovering, self._pending_cursor = True, "0"
                    continue
                if not is_unavailable(exc):
                    raise
                log.warning("store unavailable (%s); retrying in %.1f s", exc, backoff.pause)
                await backoff.wait()
                await self._reread_layout()
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
            except (*REDIS_FAILURES, AttributeError) as exc:  # (``errors.torn_connection``)
                if self._stopping or not redis_unavailable(exc):
                    raise
                log.warning("Redis unavailable (%s); retrying", exc)
                await asyncio.sleep(1.0)

    async def _finish(self) -> None:
        try:
            await self._maintain(force=True)
            if self.leads:
                await clear_health(self.redis, self.settings.stream_readings, self.consumer)
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
        await self._sweep()
        await self._sweep_incidents()
        await self._flush_held()
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
        """Run the pipeline over one batch and commit it.

        Entries delivered more than ``stream_max_deliveries`` times are suspects: the rest of
        the batch goes on as usual and each suspect is then processed alone
        (``_process_suspect``). Only a reading that itself fails is ever dead-lettered for its
        deliveries: a dependency outage is waited out with the batch in hand (no redelivery),
        and a worker killed while a suspect was not in hand alone costs it nothing.
        """
        suspects: set[str] = set()
        if redelivered:
            counts = await self.ops.delivery_counts(self.consumer, [e[0] for e in entries])
            limit = self.settings.stream_max_deliveries
            suspects = {entry_id for entry_id, n in counts.items() if n > limit}
        batch = [e for e in entries if e[0] not in suspects] if suspects else entries
        if batch:
            # New entries (``>``) on the batch's first attempt were never folded: the stateful
            # kinds skip their redelivery checks. A retry in place may follow a write of
            # theirs, so it checks again.
            attempts = iter((not redelivered,))

            def run() -> Awaitable[Outcome]:
                return self.pipeline.run(batch, fresh=next(attempts, False))

            try:
                outcome = await self._in_place(run)
            except Exception as exc:
                if not _is_reading_failure(exc):
                    raise
                log.exception("a batch failed; processing its %d entries one by one", len(batch))
                suspects |= {entry_id for entry_id, _ in batch}
            else:
                await self._commit(outcome)
        for entry in entries:
            if entry[0] in suspects:
                await self._process_suspect(entry)

    async def _process_suspect(self, entry: RawEntry) -> None:
        """Process one entry alone. Its attempt is counted in Redis before it is tried, so
        an entry that kills the worker outright (it never finishes) is dead-lettered once it
        has been in hand alone ``SUSPECT_ATTEMPTS`` times; one that raises is dead-lettered
        at once with the error."""
        entry_id, flat = entry
        attempts = await self._in_place(lambda: self.ops.count_attempt(entry_id))
        letter: DeadLetter | None = None
        if attempts > SUSPECT_ATTEMPTS:
            limit = self.settings.stream_max_deliveries
            why = (
                f"delivered more than {limit} times; processing it alone did not finish "
                f"{SUSPECT_ATTEMPTS} times"
            )
            letter = DeadLetter(entry_id, "too_many_deliveries", why, as_fields(flat))
        else:
            try:
                outcome = await self._in_place(lambda: self.pipeline.run([entry]))
            except Exception as exc:
                if not _is_reading_failure(exc):
                    raise
                log.exception("entry %s failed on its own: dead-lettered", entry_id)
                why = f"{type(exc).__name__}: {exc}"[:500]
                letter = DeadLetter(entry_id, "processing_failed", why, as_fields(flat))
        if letter is not None:
            outcome = Outcome([entry_id], {}, [letter], 0, 0, time.perf_counter())
        await self._commit(outcome)
        await self._in_place(lambda: self.ops.forget_attempt(entry_id))

    async def _in_place(self, step: Callable[[], Awaitable[T]]) -> T:
        """Run ``step``, retrying while a dependency is unavailable (the batch stays in hand,
        pending and undelivered again); on stop, give up and leave the batch pending."""
        return await retry_while(
            step,
            lambda exc: is_unavailable(exc) and not self._stopping,
            log=log,
            before_retry=self._reread_layout,
        )

    async def _reread_layout(self) -> None:
        """On Redis Cluster, before a retry: the layout read again (a master may have failed
        over), by both clients (``connections.reread_layout``)."""
        await reread_layout(self.redis, self.ops.raw)

    async def _commit(self, outcome: Outcome) -> None:
        """Write the batch's events and dead letters and acknowledge it in one atomic script
        (an ambiguous reply retried is harmless: entries no longer pending are skipped). A
        reading that closed a silence has its `no_data` event written before its own."""
        outputs: dict[str, list[Output]] = {}
        for i, notice in outcome.notices:
            outputs.setdefault(i, []).append(Output(i, "n", notice))
        carriers = outcome.carriers
        for i, event in outcome.events.items():
            # A released held reading's event is written with its carrier, in this batch.
            carrier = carriers.get(i, i) if carriers else i
            outputs.setdefault(carrier, []).append(Output(carrier, "a", event))
        for letter in outcome.dead:
            i = letter.source_id
            outputs.setdefault(i, []).append(Output(i, "d", letter.to_fields()))
        ordered = [o for i in outcome.ids for o in outputs.get(i, ())] if outputs else []
        committed, emitted, closed = await self._in_place(
            lambda: self.ops.commit(outcome.ids, ordered)
        )
        self.pipeline.count(outcome, emitted, closed)
        self.processed += committed

    async def _sweep(self) -> None:
        """Every ``silence_sweep_seconds``, claim the series gone silent (one atomic script:
        whichever worker claims a silence writes its one event)."""
        watch = self.pipeline.silence
        now = time.monotonic()
        if watch is None or now < self._next_sweep:
            return
        self._next_sweep = now + self.settings.silence_sweep_seconds
        swept = await watch.sweep()
        if swept.claimed:
            log.info("%d series went silent", swept.claimed)
            self.metrics.no_data_events.labels(self._label, "open").inc(swept.claimed)
        self.silent = swept.silent
        if self.leads:
            self.metrics.series_silent.labels(self._label).set(sum(w.silent for w in self.group))

    async def _flush_held(self) -> None:
        """With a lateness tolerance, every ``silence_sweep_seconds``: fold the held readings
        of series that stopped reporting and write their events (one script: whichever worker
        sweeps writes them once), then record them and count their onsets for incidents."""
        s = self.settings
        now = time.monotonic()
        if s.lateness_seconds <= 0 or now < self._next_flush:
            return
        self._next_flush = now + s.silence_sweep_seconds
        flushed = await self.streams.flush(
            anomalies=self.shard.anomalies, maxlen=s.stream_anomalies_maxlen
        )
        if not flushed:
            return
        log.info("%d event(s) of held readings flushed", len(flushed))
        self.metrics.count_batch(0, 0, [], len(flushed))
        await self.pipeline.flushed(flushed)

    async def _sweep_incidents(self) -> None:
        """Every ``incident_sweep_seconds``, close an incident no onset joined for its window
        (one atomic script: whichever worker closes it writes its one closed event) and
        record events whose worker died before recording them."""
        tracker = self.pipeline.incidents
        now = time.monotonic()
        if tracker is None or not self.leads or now < self._next_incident_sweep:
            return
        self._next_incident_sweep = now + self.settings.incident_sweep_seconds
        changes = await tracker.sweep()
        await self._in_place(lambda: self.pipeline.settle_incidents(changes))

    @property
    def leads(self) -> bool:
        """Whether this is its process' first worker (or its only one)."""
        return self.group[0] is self

    async def _heartbeat(self) -> None:
        now = time.monotonic()
        if not self.leads or now < self._next_heartbeat:
            return
        ttl = self.settings.worker_heartbeat_ttl_seconds
        self._next_heartbeat = now + max(0.5, ttl / 3)
        await record_health(
            self.redis,
            self.settings.stream_readings,
            self.consumer,
            ttl=ttl,
            processed=sum(w.processed for w in self.group),
        )

    async def _maintain(self, *, force: bool = False) -> None:
        """Trim `readings` below what the groups still need, refresh the lag gauges."""
        now = time.monotonic()
        if not force and now < self._next_maintenance:
            return
        self._next_maintenance = now + self.settings.stream_trim_interval_ms / 1000
        await self.ops.trim_readings()
        self.lag, self.pending = await self.ops.lag(), await self.ops.pending_count()
        if self.leads:
            self.metrics.consumer_lag.labels(self._label).set(sum(w.lag for w in self.group))
            self.metrics.pending_entries.labels(self._label).set(sum(w.pending for w in self.group))


def _first_shard(settings: Settings) -> Shard:
    return shard(settings, 0)


def workers(
    settings: Settings,
    redis_client: Redis,
    pool: AsyncConnectionPool,
    *,
    metrics: WorkerMetrics,
    consumer: str | None = None,
) -> list[Worker]:
    """One worker a shard (STREAM_SHARDS), all of them consumers of their shard's group
    under one consumer name, sharing the process' model store (its caches) and incident
    tracker (incidents are fleet-wide: their keys and events live in the first shard's
    slot, ``detector.state.incidents``). Run them with ``run_workers``.

    Every process serves every shard: the shards' consumer groups share out the entries
    between the processes and hand a dead one's pending entries to the others (claims), so
    workers join and leave without any assignment to rebalance."""
    store = ModelStore(redis_client, pool, cache_size=settings.model_cache_size)
    raw = reply_twin(settings, redis_client)
    every = shards(settings)
    tracker = incident_tracker(
        settings,
        redis_client,
        output=every[0].anomalies,
        fleet=[silence_key(s.anomalies, "series") for s in every] if len(every) > 1 else None,
    )
    group = [
        Worker(
            settings,
            redis_client,
            pool,
            metrics=metrics,
            consumer=consumer,
            store=store,
            shard=s,
            incidents=tracker,
            raw=raw,
        )
        for s in every
    ]
    for worker in group:
        worker.group = group
    return group


async def run_workers(group: Sequence[Worker], *, burst: bool = False) -> None:
    """Run a process' workers together until each stops (a burst: until each shard is
    drained); the first error stops the others, then is raised."""
    # A cluster client learns the layout on its first command; the shards' first commands
    # all at once would race in it (redis-py marks every connection for a reconnect while
    # others are connecting), so the clients learn it first, one at a time.
    await prepare_clients(*{id(c): c for w in group for c in (w.redis, w.ops.raw)}.values())
    tasks = [asyncio.create_task(w.run(burst=burst), name=f"shard-{w.shard.label}") for w in group]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            if task.exception() is not None:
                for worker in group:
                    worker.request_stop()
                break
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()


def _is_reading_failure(exc: BaseException) -> bool:
    """An error that processing a reading raised by itself, not an unavailable dependency or
    a stream that changed under the worker (those are handled by the consume loop)."""
    return isinstance(exc, Exception) and not (
        is_unavailable(exc) or isinstance(exc, redis.exceptions.ResponseError)
    )
