"""The stream pipeline, for every transport: parse → resolve models → score → update state →
episodes → dead letters → record. The transport reads the batch and commits the outcome.

``detector.transports.redis`` and ``detector.transports.kafka`` are thin adapters around
``Pipeline.run``: they turn what they read into ``RawEntry`` pairs (source id, flat fields),
and commit the ``Outcome`` their own way (one Lua script; produced records and offsets).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np
import psycopg

from detector.errors import POSTGRES_ERRORS, ModelNotFoundError, StoreUnavailableError
from detector.kinds.base import severity
from detector.kinds.registry import STATEFUL
from detector.kinds.static import ABOVE, StaticModel, flag
from detector.metrics import WorkerMetrics
from detector.settings import Settings
from detector.state.episodes import EpisodeTracker
from detector.state.series import Acknowledged, SeriesStates, StreamReading
from detector.store.history import record_anomalies
from detector.store.latest import LatestVersions
from detector.store.models import ModelStore
from detector.wire.events import event_fields
from detector.wire.readings import DeadLetter, RawEntry, ReadingBatch, as_fields, parse_batch

log = logging.getLogger(__name__)

_MAX_BACKOFF = 5.0


@dataclass(slots=True)
class ScoredBatch:
    """What scoring a batch found: the events of anomalous readings (by source id, in batch
    order), readings of series without a model, and pinned versions that do not exist."""

    events: dict[str, dict[str, str]] = field(default_factory=dict)
    no_model: int = 0
    unknown: list[tuple[str, str]] = field(default_factory=list)  # (source id, why)
    opened: int = 0  # episodes opened by stateful kinds (their own alerts)


@dataclass(slots=True)
class Outcome:
    """A processed batch, ready for its transport to commit: every entry id in batch order,
    the anomaly events (source id → fields) and the dead letters."""

    ids: list[str]
    events: dict[str, dict[str, str]]
    dead: list[DeadLetter]
    scored: int
    no_model: int
    started: float


class Pipeline:
    """One transport's batch flow. ``source`` labels the anomaly history rows (the stream or
    topic the readings came from); ``acknowledged`` (optional) tells stateful kinds which
    source ids can never be delivered again, bounding their redelivery bookkeeping."""

    def __init__(
        self,
        settings: Settings,
        store: ModelStore,
        *,
        source: str,
        metrics: WorkerMetrics,
        streams: SeriesStates,
        stopping: Callable[[], bool] = lambda: False,
    ) -> None:
        self.settings = settings
        self.store = store
        self.source = source
        self.metrics = metrics
        self.latest = LatestVersions(store, settings.model_refresh_seconds)
        self.streams = streams
        self.episodes = (
            EpisodeTracker(
                store.redis,
                quiet_seconds=settings.episode_quiet_seconds,
                history=settings.episode_history,
            )
            if settings.episodes
            else None
        )
        self.stopping = stopping

    async def run(
        self,
        entries: Sequence[RawEntry],
        *,
        dead: Sequence[DeadLetter] = (),
        acknowledged: Acknowledged | None = None,
    ) -> Outcome:
        """Process one batch; ``dead`` are letters the transport already decided."""
        started = time.perf_counter()
        letters = list(dead)
        batch, invalid = parse_batch(entries)
        letters += invalid
        scored = await score_batch(
            batch, self.store, self.latest, self.streams, acknowledged=acknowledged
        )
        label = self.source
        if scored.opened:  # the stateful kinds' own alerts (their events carry episodes)
            self.metrics.episodes_opened.labels(label).inc(scored.opened)
        if self.episodes is not None and scored.events:
            # Counted here, once: a redelivered opener is recognised by the script.
            opened = await self.episodes.assign(scored.events)
            self.metrics.episodes_opened.labels(label).inc(opened)
        if scored.unknown:
            raw = dict(entries)
            letters += [
                DeadLetter(i, "unknown_version", why, as_fields(raw[i]))
                for i, why in scored.unknown
            ]
        if scored.events and self.settings.stream_record_postgres:
            await self._record(list(scored.events.values()))
        return Outcome(
            ids=[entry_id for entry_id, _ in entries],
            events=scored.events,
            dead=letters,
            scored=len(batch) - scored.no_model - len(scored.unknown),
            no_model=scored.no_model,
            started=started,
        )

    def count(self, outcome: Outcome, emitted: int) -> None:
        """Metrics of a committed batch."""
        m, label = self.metrics, self.metrics.transport
        m.count_batch(outcome.scored, outcome.no_model, [d.reason for d in outcome.dead], emitted)
        m.batch_duration.labels(label).observe(time.perf_counter() - outcome.started)
        m.last_batch.labels(label).set(time.time())

    async def _record(self, events: list[dict[str, str]]) -> None:
        """Write anomalies to PostgreSQL (idempotent on source and source id), retrying in
        place while it is down: the batch stays in hand and unacknowledged, so an outage
        never spends the readings' delivery budget."""
        backoff = 0.2
        while True:
            try:
                await record_anomalies(self.store.pool, self.source, events)
                return
            except (*POSTGRES_ERRORS, psycopg.Error) as exc:
                if self.stopping():
                    raise StoreUnavailableError("postgres", str(exc)) from exc
                log.warning("PostgreSQL unavailable (%s); retrying in %.1f s", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(_MAX_BACKOFF, backoff * 2)


async def score_batch(
    batch: ReadingBatch,
    store: ModelStore,
    latest: LatestVersions,
    streams: SeriesStates | None = None,
    *,
    acknowledged: Acknowledged | None = None,
) -> ScoredBatch:
    """Score a whole batch with a handful of numpy operations, whatever its mix of series.

    Each distinct (series, version) gets one row of its stateless rule's parameters; every
    reading is mapped to its row and judged at once by ``detector.kinds.static.flag``, the
    rule every front end uses. Python work per reading is a dict lookup; events are built
    only for the anomalous ones, in batch order.

    With ``streams``, readings whose latest model is of a stateful kind (and that pin no
    version) are folded into their series' state instead (``detector.state.series``);
    their events carry the kind's own episode fields. Pinned readings are scored by their
    version's stateless rule, as ``POST /predict`` does.
    """
    scored = ScoredBatch()
    n = len(batch)
    if n == 0:
        return scored
    series_ids, versions = batch.series_ids, batch.versions
    if versions is None:
        pointers = await latest.resolve(dict.fromkeys(series_ids))
        keys: Sequence[Hashable] = series_ids
        pairs: dict[Hashable, tuple[str, int | None]] = {s: (s, v) for s, v in pointers.items()}
    else:
        pointers = await latest.resolve(
            dict.fromkeys(s for s, v in zip(series_ids, versions, strict=True) if v is None)
        )
        keys = [
            (s, pointers[s] if v is None else v) for s, v in zip(series_ids, versions, strict=True)
        ]
        pairs = {key: key for key in dict.fromkeys(keys)}  # type: ignore[misc]
    # Row 0 stands for "no model": NaN bounds never compare true.
    rows: dict[Hashable, int] = {}
    models: list[tuple[int, StaticModel] | None] = [None]
    missing: dict[int, str] = {}  # row → why its pinned version does not exist
    for key, (series_id, version) in pairs.items():
        if version is None:
            rows[key] = 0
            continue
        found = store.cache.get((series_id, version))
        if found is None:
            try:
                found = await store.get(series_id, version)
            except ModelNotFoundError as exc:
                rows[key] = len(models)
                missing[len(models)] = exc.detail
                models.append(None)
                continue
        rows[key] = len(models)
        models.append((version, found.model))
    nan = (np.nan, np.nan, np.nan, np.nan, ABOVE)
    params = np.array(
        [
            nan
            if m is None
            else (m[1].mean, m[1].std, m[1].lower, m[1].upper, m[1].direction_code)
            for m in models
        ]
    )
    index = np.fromiter(map(rows.__getitem__, keys), dtype=np.intp, count=n)
    values = batch.values
    rule = params[index]
    anomaly = np.asarray(flag(values, rule[:, 2], rule[:, 3], rule[:, 4].astype(np.int8)))
    stream_rows: list[int] = []
    if streams is not None and any(m is not None and m[1].kind in STATEFUL for m in models):
        stateful = np.array([m is not None and m[1].kind in STATEFUL for m in models])
        in_stream = stateful[index]
        if versions is not None:
            in_stream &= np.array([v is None for v in versions], dtype=bool)
        anomaly = anomaly & ~in_stream
        stream_rows = np.flatnonzero(in_stream).tolist()
    without_model = np.array([m is None for m in models])[index]
    scored.no_model = int(np.count_nonzero(without_model))
    if missing:  # a pinned version that does not exist; the latest pointer raced a withdrawal
        for i in np.flatnonzero(np.isin(index, list(missing))).tolist():
            if versions is not None and versions[i] is not None:
                scored.no_model -= 1
                scored.unknown.append((batch.source_ids[i], missing[int(index[i])]))
    detected_at = time.time()
    for i in np.flatnonzero(anomaly).tolist():
        row = int(index[i])
        version, model = models[row]  # type: ignore[misc]
        z = float((values[i] - params[row, 0]) / params[row, 1])
        ratio = abs(z) / model.sigma
        scored.events[batch.source_ids[i]] = event_fields(
            batch.reading(i),
            version=version,
            mean=model.mean,
            std=model.std,
            lower=model.lower,
            upper=model.upper,
            score=z,
            detected_at=detected_at,
            extra={
                "kind": model.kind,
                "test": "threshold",
                "expected": repr(model.mean),
                "severity": f"{float(severity(ratio)):.1f}",
                "detector_score": repr(ratio),
            },
        )
    if stream_rows and streams is not None:
        folded, scored.opened = await streams.fold(
            [
                StreamReading(
                    batch.source_ids[i],
                    batch.series_ids[i],
                    int(batch.timestamps[i]),
                    float(values[i]),
                    models[int(index[i])][0],  # type: ignore[index]
                    models[int(index[i])][1].kind,  # type: ignore[index]
                )
                for i in stream_rows
            ],
            detected_at=detected_at,
            acknowledged=acknowledged,
        )
        if folded:
            merged = scored.events | folded
            scored.events = {i: merged[i] for i in batch.source_ids if i in merged}
    return scored

