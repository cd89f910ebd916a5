"""The stream pipeline, for every transport: parse → resolve models → score → update state →
episodes → incidents (``detector.state.incidents``) → silent series
(``detector.state.silence``) → dead letters → record. The transport reads the batch and
commits the outcome.

``detector.transports.redis`` and ``detector.transports.kafka`` are thin adapters around
``Pipeline.run``: they turn what they read into ``RawEntry`` pairs (source id, flat fields),
and commit the ``Outcome`` their own way (one Lua script; produced records and offsets).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from itertools import chain
from operator import itemgetter
from typing import Any

import numpy as np
import psycopg

from detector.errors import POSTGRES_ERRORS, ModelNotFoundError, StoreUnavailableError
from detector.kinds.base import severity, signed_z
from detector.kinds.registry import STATEFUL
from detector.kinds.static import ABOVE, StaticModel, flag
from detector.metrics import WorkerMetrics
from detector.retry import retry_while
from detector.settings import Settings
from detector.state.episodes import EpisodeTracker
from detector.state.incidents import IncidentChanges, IncidentTracker, onsets_of
from detector.state.series import Acknowledged, SeriesStates, StreamReading
from detector.state.silence import SilenceWatch, seen_series
from detector.store.history import record_anomalies
from detector.store.incidents import record_incidents
from detector.store.latest import LatestVersions
from detector.store.models import ModelStore
from detector.wire.events import event_fields
from detector.wire.readings import DeadLetter, RawEntry, ReadingBatch, as_fields, parse_batch

log = logging.getLogger(__name__)

_SOURCE_ID = itemgetter(0)
# What a failed history write raises; retried in place (see ``Pipeline._record``).
_HISTORY_ERRORS = (*POSTGRES_ERRORS, psycopg.Error)


@dataclass(slots=True)
class ScoredBatch:
    """What scoring a batch found: the events of anomalous readings (by source id, in batch
    order), readings of series without a model, and pinned versions that do not exist."""

    events: dict[str, dict[str, str]] = field(default_factory=dict)
    no_model: int = 0
    unknown: list[tuple[str, str]] = field(default_factory=list)  # (source id, why)
    opened: int = 0  # episodes opened by stateful kinds (their own alerts)
    # Per reading, the version that judged it; None without a model (the silence watch).
    versions: list[int | None] = field(default_factory=list)
    # Events of readings a stateful series held in earlier batches, released by this one:
    # event source id → the batch's reading whose commit writes it (``state.lateness``).
    carriers: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class Outcome:
    """A processed batch, ready for its transport to commit: every entry id in batch order,
    the anomaly events (source id → fields), the dead letters, and the `no_data` events that
    readings of silent series closed ((source id of the closing reading, fields), written
    with that reading, before its own event; never recorded as anomalies). ``incidents``
    are the `incident` events its onsets caused: on Redis Streams already written by the
    incident script; the Kafka worker produces them, then calls ``incidents_delivered``."""

    ids: list[str]
    events: dict[str, dict[str, str]]
    dead: list[DeadLetter]
    scored: int
    no_model: int
    started: float
    notices: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    incidents: list[dict[str, str]] = field(default_factory=list)
    # Events (by their source id) written with another entry of the batch, their carrier:
    # readings held by a stateful series' reorder buffer (``detector.state.lateness``).
    carriers: dict[str, str] = field(default_factory=dict)


def merge_outcomes(outcomes: Sequence[Outcome]) -> Outcome:
    """One outcome of the parts of a batch run through several pipelines (the Kafka worker's
    key shards on Redis Cluster), each part's entries, events and letters in its order."""
    if len(outcomes) == 1:
        return outcomes[0]
    return Outcome(
        ids=[i for o in outcomes for i in o.ids],
        events={k: v for o in outcomes for k, v in o.events.items()},
        dead=[d for o in outcomes for d in o.dead],
        scored=sum(o.scored for o in outcomes),
        no_model=sum(o.no_model for o in outcomes),
        started=min(o.started for o in outcomes),
        notices=[n for o in outcomes for n in o.notices],
        incidents=[e for o in outcomes for e in o.incidents],
        carriers={k: v for o in outcomes for k, v in o.carriers.items()},
    )


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
        silence: SilenceWatch | None = None,
        incidents: IncidentTracker | None = None,
        namespace: str = "",
        history_source: str = "stream",
    ) -> None:
        self.settings = settings
        self.store = store
        self.source = source
        # What the anomaly history's ``source`` column says of this pipeline's rows.
        self.history_source = history_source
        self.metrics = metrics
        self.latest = LatestVersions(store, settings.model_refresh_seconds)
        self.rules = RuleRows(max(1, settings.model_cache_size))
        self.streams = streams
        self.episodes = (
            EpisodeTracker(
                store.redis,
                quiet_seconds=settings.episode_quiet_seconds,
                history=settings.episode_history,
                namespace=namespace,
            )
            if settings.episodes
            else None
        )
        self.stopping = stopping
        self.silence = silence
        self.incidents = incidents

    async def run(
        self,
        entries: Sequence[RawEntry],
        *,
        dead: Sequence[DeadLetter] = (),
        acknowledged: Acknowledged | None = None,
        fresh: bool = False,
    ) -> Outcome:
        """Process one batch; ``dead`` are letters the transport already decided. ``fresh``:
        every entry is delivered for the first time, in delivery order, and this is the
        batch's first attempt (``detector.state.series.fold_states``)."""
        started = time.perf_counter()
        batch, invalid = parse_batch(entries)
        return await self.run_batch(
            batch,
            ids=list(map(_SOURCE_ID, entries)),
            dead=[*dead, *invalid],
            acknowledged=acknowledged,
            raw=entries,
            started=started,
            fresh=fresh,
        )

    async def run_batch(
        self,
        batch: ReadingBatch,
        *,
        ids: list[str] | None = None,
        dead: Sequence[DeadLetter] = (),
        acknowledged: Acknowledged | None = None,
        raw: Sequence[RawEntry] | None = None,
        started: float | None = None,
        fresh: bool = False,
    ) -> Outcome:
        """Process readings already parsed (``run`` parses a transport's raw entries; a
        backfill hands its validated columns here). ``ids``: every source id of the batch in
        order (default: the batch's); ``raw``: the raw entries, for dead letters' fields."""
        started = time.perf_counter() if started is None else started
        letters = list(dead)
        scored = await score_batch(
            batch,
            self.store,
            self.latest,
            self.streams,
            acknowledged=acknowledged,
            rules=self.rules,
            fresh=fresh,
        )
        label = self.source
        if scored.opened:  # the stateful kinds' own alerts (their events carry episodes)
            self.metrics.episodes_opened.labels(label).inc(scored.opened)
        if self.episodes is not None and scored.events:
            # Counted here, once: a redelivered opener is recognised by the script.
            opened = await self.episodes.assign(scored.events)
            self.metrics.episodes_opened.labels(label).inc(opened)
        changes = None
        if self.incidents is not None and scored.events:
            onsets = onsets_of(scored.events)
            if onsets:  # a batch without onsets costs nothing here
                changes = await self.incidents.observe(onsets)
                await self.settle_incidents(changes)
        if scored.unknown:
            fields = dict(raw) if raw is not None else {}
            letters += [
                DeadLetter(i, "unknown_version", why, as_fields(fields.get(i)))
                for i, why in scored.unknown
            ]
        notices: list[tuple[str, dict[str, str]]] = []
        if self.silence is not None and len(batch):
            seen = seen_series(
                batch.source_ids, batch.series_ids, batch.timestamps.tolist(), scored.versions
            )
            closed = await self.silence.observe(seen)
            notices = [(n["resumed_source_id"], n) for n in closed]
        outcome = Outcome(
            ids=list(batch.source_ids) if ids is None else ids,
            events=scored.events,
            dead=letters,
            scored=len(batch) - scored.no_model - len(scored.unknown),
            no_model=scored.no_model,
            started=started,
            notices=notices,
            incidents=changes.events if changes is not None else [],
            carriers=scored.carriers,
        )
        if outcome.events and self.settings.stream_record_postgres:
            await self._record(
                lambda: record_anomalies(
                    self.store.pool,
                    self.source,
                    list(outcome.events.values()),
                    source=self.history_source,
                    retention_days=self.settings.retention_anomalies_days,
                )
            )
        return outcome

    async def settle_incidents(self, changes: IncidentChanges) -> None:
        """After an incident script call (a batch's onsets or a sweep): count, record the
        incidents' states in PostgreSQL (idempotent), and on Redis Streams, where the script
        already wrote the events, take them out of the outbox; the Kafka worker does that
        once it has produced them (``incidents_delivered``)."""
        tracker = self.incidents
        if tracker is None:
            return
        label = self.metrics.transport
        if changes.opened:
            log.info("%d incident(s) opened", changes.opened)
            self.metrics.incidents_opened.labels(label).inc(changes.opened)
        self.metrics.incidents_active.labels(label).set(changes.active)
        rows = changes.rows()
        if rows and self.settings.stream_record_postgres:
            await self._record(lambda: record_incidents(self.store.pool, tracker.source, rows))
        if tracker.mode == "xadd":
            await tracker.delivered(changes.events)

    async def flushed(self, events: Sequence[dict[str, str]]) -> None:
        """After a sweep wrote the events of held readings (``SeriesStates.flush``): their
        onsets count for incidents and they are recorded in the history, as a batch's are."""
        label = self.metrics.transport
        opened = sum(e.get("onset") == "1" for e in events)
        if opened:
            self.metrics.episodes_opened.labels(label).inc(opened)
        if self.incidents is not None:
            onsets = onsets_of({e["source_id"]: e for e in events})
            if onsets:
                await self.settle_incidents(await self.incidents.observe(onsets))
        if self.settings.stream_record_postgres:
            await self._record(
                lambda: record_anomalies(
                    self.store.pool,
                    self.source,
                    list(events),
                    source=self.history_source,
                    retention_days=self.settings.retention_anomalies_days,
                )
            )

    async def incidents_delivered(self, events: Sequence[dict[str, str]]) -> None:
        """Kafka: the broker acknowledged these `incident` events."""
        if self.incidents is not None:
            await self.incidents.delivered(events)

    def count(self, outcome: Outcome, emitted: int, closed: int = 0) -> None:
        """Metrics of a committed batch (``closed``: its `no_data` closed events written)."""
        m, label = self.metrics, self.metrics.transport
        m.count_batch(outcome.scored, outcome.no_model, [d.reason for d in outcome.dead], emitted)
        if closed:
            m.no_data_events.labels(label, "closed").inc(closed)
        m.batch_duration.labels(label).observe(time.perf_counter() - outcome.started)
        m.last_batch.labels(label).set(time.time())

    async def _record(self, write: Callable[[], Awaitable[None]]) -> None:
        """Write to PostgreSQL (idempotent writes: anomalies on source and source id,
        incidents' states), retrying in place while it is down: the batch stays in hand and
        unacknowledged, so an outage never spends the readings' delivery budget."""
        try:
            await retry_while(
                write,
                lambda exc: isinstance(exc, _HISTORY_ERRORS) and not self.stopping(),
                log=log,
                what="PostgreSQL unavailable",
                first=0.2,
            )
        except _HISTORY_ERRORS as exc:  # stopping: the batch stays pending
            raise StoreUnavailableError("postgres", str(exc)) from exc


async def score_batch(
    batch: ReadingBatch,
    store: ModelStore,
    latest: LatestVersions,
    streams: SeriesStates | None = None,
    *,
    acknowledged: Acknowledged | None = None,
    rules: RuleRows | None = None,
    fresh: bool = False,
) -> ScoredBatch:
    """Score a whole batch with a handful of numpy operations, whatever its mix of series.

    Each distinct (series, version) gets one row of its stateless rule's parameters; every
    reading is mapped to its row and judged at once by ``detector.kinds.static.flag``, the
    rule every front end uses. Python work per reading is a dict lookup; events are built
    only for the anomalous ones, in batch order. ``rules`` keeps each version's row across
    batches (versions are immutable).

    With ``streams``, readings whose latest model is of a stateful kind (and that pin no
    version) are folded into their series' state instead (``detector.state.series``);
    their events carry the kind's own episode fields. Pinned readings are scored by their
    version's stateless rule, as ``POST /predict`` does. ``fresh``: the readings are first
    deliveries, in delivery order (``SeriesStates.fold``).
    """
    scored = ScoredBatch()
    n = len(batch)
    if n == 0:
        return scored
    series_ids, versions = batch.series_ids, batch.versions
    if rules is None:
        rules = RuleRows()
    triples: Iterable[tuple[Hashable, str, int | None]]
    if versions is None:
        pointers = await latest.resolve(dict.fromkeys(series_ids))
        keys: Sequence[Hashable] = series_ids
        triples = ((s, s, v) for s, v in pointers.items())
    else:
        pointers = await latest.resolve(
            dict.fromkeys(s for s, v in zip(series_ids, versions, strict=True) if v is None)
        )
        keys = [
            (s, pointers[s] if v is None else v) for s, v in zip(series_ids, versions, strict=True)
        ]
        triples = ((key, *key) for key in dict.fromkeys(keys))  # type: ignore[misc]
    triples = list(triples)
    # The models of versions new to this process (a series' first readings, a refit) come
    # from Redis in one round trip for the whole batch, not one a series.
    await store.prefetch(
        [(s, v) for _, s, v in triples if v is not None and rules.get((s, v)) is None]
    )
    # Row 0 stands for "no model": NaN bounds never compare true.
    rows: dict[Hashable, int] = {}
    models: list[tuple[int, StaticModel] | None] = [None]
    rule_rows: list[Rule] = [_NO_RULE]
    missing: dict[int, str] = {}  # row → why its pinned version does not exist
    for key, series_id, version in triples:
        if version is None:
            rows[key] = 0
            continue
        entry = rules.get((series_id, version))
        if entry is None:
            found = store.cache.get((series_id, version))
            if found is None:
                try:
                    found = await store.get(series_id, version)
                except ModelNotFoundError as exc:
                    rows[key] = len(models)
                    missing[len(models)] = exc.detail
                    models.append(None)
                    rule_rows.append(_NO_RULE)
                    continue
            entry = rules.put(series_id, version, found.model)
        rows[key] = len(models)
        models.append(entry[0])
        rule_rows.append(entry[1])
    # Flattened, then shaped: np.array over a list of tuples costs twice as much.
    params = np.fromiter(
        chain.from_iterable(rule_rows), dtype=np.float64, count=len(rule_rows) * len(_NO_RULE)
    ).reshape(len(rule_rows), len(_NO_RULE))
    index = np.fromiter(map(rows.__getitem__, keys), dtype=np.intp, count=n)
    row_versions = [None if m is None else m[0] for m in models]
    scored.versions = [row_versions[r] for r in index.tolist()]
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
    flagged = np.flatnonzero(anomaly)
    # The flagged readings' z at once (a numpy call each would cost more than the rest).
    zs = signed_z(values[flagged], rule[flagged, 0], rule[flagged, 1]).tolist()
    for i, z in zip(flagged.tolist(), zs, strict=True):
        row = int(index[i])
        version, model = models[row]  # type: ignore[misc]
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
        # Python values once per batch (numpy scalars indexed one by one cost more), one
        # column at a time, zipped into the readings' tuples in C (no call a reading).
        picked = index[stream_rows].tolist()
        columns: list[Sequence[Any]] = [
            batch.source_ids,
            series_ids,
            batch.timestamps.tolist(),
            values.tolist(),
        ]
        if len(stream_rows) < n:
            columns = [[column[i] for i in stream_rows] for column in columns]
        versions_of = [0 if m is None else m[0] for m in models]
        kinds_of = ["" if m is None else m[1].kind for m in models]
        columns += [[versions_of[r] for r in picked], [kinds_of[r] for r in picked]]
        folded, scored.opened, scored.carriers = await streams.fold(
            list(map(_STREAM_READING, zip(*columns, strict=True))),
            detected_at=detected_at,
            acknowledged=acknowledged,
            fresh=fresh,
        )
        if folded:
            merged = scored.events | folded
            order: Iterable[str] = batch.source_ids
            if scored.carriers:  # released held readings go just before their carrier
                carried: dict[str, list[str]] = {}
                for event_id, carrier in scored.carriers.items():
                    carried.setdefault(carrier, []).append(event_id)
                order = [e for i in batch.source_ids for e in (*carried.get(i, ()), i)]
            scored.events = {i: merged[i] for i in order if i in merged}
    return scored


# A StreamReading from a tuple of its fields, built in C (``StreamReading(*t)`` is a call).
_STREAM_READING = partial(tuple.__new__, StreamReading)

# A static rule's parameters as score_batch lays them out: μ, σ, lower and upper bound,
# direction code; the row of "no model" never flags anything (NaN bounds).
Rule = tuple[float, float, float, float, int]
_NO_RULE: Rule = (np.nan, np.nan, np.nan, np.nan, ABOVE)


class RuleRows:
    """Each (series, version)'s model and rule row, kept across batches: versions never
    change once made, so an entry is never stale. Bounded: emptied when ``capacity`` is
    reached (the next batches rebuild what they use from the model store's cache)."""

    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self._rows: dict[tuple[str, int], tuple[tuple[int, StaticModel], Rule]] = {}

    def get(self, key: tuple[str, int]) -> tuple[tuple[int, StaticModel], Rule] | None:
        return self._rows.get(key)

    def put(
        self, series_id: str, version: int, model: StaticModel
    ) -> tuple[tuple[int, StaticModel], Rule]:
        if len(self._rows) >= self.capacity:
            self._rows.clear()
        entry = (
            (version, model),
            (model.mean, model.std, model.lower, model.upper, model.direction_code),
        )
        self._rows[(series_id, version)] = entry
        return entry
