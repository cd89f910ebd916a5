"""Stateful kinds in the stream: one state per series in Redis, updated with compare-and-set.

Each series whose latest model is of a stateful kind (``seasonal``, ``multiscale``) has a hash
``state:{<series_id>}`` with two fields: ``seq`` (a sequence number, bumped by every write) and
``data`` (``SeriesState`` as JSON, about 1 KB: the kind and version it belongs to, the kind's
state, the count of readings folded, the current episode and the bookkeeping that makes
redelivery safe).

Per batch, the worker loads the states of the batch's stateful series in one pipeline (with
the group's oldest pending entry id), folds every series' readings in timestamp order with one
call of its kind's ``fold`` (vectorised across series for ``seasonal``), and writes all the
states back with one Lua compare-and-set: a
state is written only if its ``seq`` is still the one read. A series whose state another worker
changed meanwhile is loaded and folded again (its readings onto the other worker's result), so
two workers never lose each other's updates; the other series of the batch are kept.

**Redelivery.** A reading is folded once. The state remembers the source ids it folded that
may still come back (``ids``), and the outcomes of its anomalous ones (``recent``): a reading
found there is not folded again, and if it was anomalous its event is emitted again, the same
(the commit script writes an event only for an entry still pending, so nothing is doubled). An
entry id below the group's oldest pending entry has been acknowledged and can never be
delivered again, so such ids are dropped from the state at each write (bounded memory; the
state keeps an upper bound of its ids' order, so the common case, every id of the previous
batch acknowledged, is one comparison); a reading whose id is already below it was
committed by another consumer and is skipped. A group's new entries (``>``) on their first
attempt were never delivered before, so the worker folds them as ``fresh``: none is looked
up in the state's ids and only a series' newest id is parsed (for the bound).

**Out of order.** With a lateness tolerance (``LATENESS_SECONDS``) the state also holds the
series' newest readings until its watermark passes them, so readings shuffled within the
tolerance are folded in timestamp order across batches; later ones are scored without being
folded and flagged ``late`` (``detector.state.lateness``).

**Versions.** The state carries its version. When the series' latest version is newer (a
refit), the state starts again from that version's initial state (fitted on its training data,
stored in ``model_versions.params``); when the state is newer than the version a worker
resolved (its cached latest pointer is a little stale), the readings are folded into the newer
state. Readings that pin a version are scored by that version's stateless rule instead.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from operator import itemgetter, lt
from typing import Any, NamedTuple, TypeVar

import numpy as np
import orjson
from redis.asyncio import Redis
from redis.client import NEVER_DECODE
from redis.exceptions import NoScriptError

from detector.errors import ModelNotFoundError
from detector.feedback import IDENTITY
from detector.kinds.base import TESTS, Folded, StatefulKind, severity
from detector.kinds.registry import prepare_stateful, stateful_kind
from detector.redis_keys import held_key, state_key
from detector.scripts import lua
from detector.state.adjustments import Adjustments
from detector.state.lateness import release
from detector.store.models import ModelStore
from detector.wire.events import event_fields
from detector.wire.readings import Reading

log = logging.getLogger(__name__)

# A conflict means another worker wrote the series meanwhile; each retry makes progress for
# somebody, so running out means something is badly wrong.
MAX_ATTEMPTS = 1000
# Safety bound on the redelivery bookkeeping of one series (normally a few batches' worth).
MAX_TRACKED = 100_000
IDENTITY_SCALES = IDENTITY.scales()


class StreamReading(NamedTuple):
    """A reading whose resolved (latest) model is of a stateful kind (a tuple: a batch makes
    one per reading, and a tuple is the cheapest record Python builds)."""

    source_id: str
    series_id: str
    timestamp: int
    value: float
    version: int
    kind: str


@dataclass(slots=True)
class SeriesState:
    """What ``state:{<series_id>}`` holds."""

    kind: str
    version: int
    state: Any  # the kind's own state (``StatefulKind.decode_state``)
    count: int = 0  # readings folded into this version's state
    episode_id: str | None = None  # the source id of the latest alert
    ids: list[str] = field(default_factory=list)  # folded ids that may still be redelivered
    # An upper bound of the ids' ``entry_order`` (None: unknown), kept for a Redis group: its
    # ids are all acknowledged once this bound is below the group's oldest pending entry.
    top: tuple[int, int] | None = None
    # Anomalous outcomes for re-emission:
    # [source_id, expected, std, z, ratio, onset, episode_id, test, lower, upper], then for
    # a late or held reading or a kind that reports a base score: [late, carrier, timestamp,
    # value], then the base score (``Folded.level``) if there is one.
    recent: list[list[Any]] = field(default_factory=list)
    # Static feedback scales an older worker multiplied into the state's thresholds, undone
    # by the kind's ``adjust`` (the adjustment now travels in the state itself).
    scales: tuple[float, ...] = IDENTITY_SCALES
    # The reorder buffer (only with a lateness tolerance, ``detector.state.lateness``): the
    # newest timestamp seen, the newest folded, and the readings held until the watermark
    # (newest − tolerance) passes them, as [source_id, timestamp, value] in fold order.
    newest: int | None = None
    through: int | None = None
    held: list[list[Any]] = field(default_factory=list)

    def to_bytes(self) -> bytes:
        """The stored form: a JSON header (kind, version, bookkeeping), then, for a kind whose
        state is a row of floats (seasonal), a NUL and the row's little-endian bytes as they
        are (JSON never holds a raw NUL); another kind's state goes in the header."""
        data: dict[str, Any] = {
            "kind": self.kind,
            "version": self.version,
            "count": self.count,
            "episode_id": self.episode_id,
            "ids": self.ids,
            "recent": self.recent,
        }
        if self.scales != IDENTITY_SCALES:
            data["scales"] = list(self.scales)
        if self.top is not None and self.ids:
            data["top"] = self.top
        if self.newest is not None:  # absent without a tolerance: the format of before
            data["newest"], data["through"], data["held"] = self.newest, self.through, self.held
        if isinstance(self.state, np.ndarray):
            return orjson.dumps(data) + b"\0" + np.ascontiguousarray(self.state, "<f8").tobytes()
        data["state"] = _plugin(self.kind).encode_state(self.state)
        return orjson.dumps(data)

    @classmethod
    def from_bytes(cls, raw: bytes) -> SeriesState:
        """``to_bytes``' form, or the JSON of states stored before it (the state in the header,
        a float row as base64 text)."""
        head, raw_row, row = raw.partition(b"\0")
        data = orjson.loads(head)
        kind = data.get("kind", "multiscale")  # states written before kinds were named
        state = (
            np.frombuffer(row, dtype="<f8").astype(np.float64)
            if raw_row
            else _plugin(kind).decode_state(data["state"])
        )
        return cls(
            kind=kind,
            version=int(data["version"]),
            state=state,
            count=int(data["count"]),
            episode_id=data["episode_id"],
            ids=list(data["ids"]),
            top=tuple(data["top"]) if data.get("top") else None,
            recent=list(data["recent"]),
            scales=tuple(float(v) for v in data.get("scales", IDENTITY_SCALES)),
            newest=data.get("newest"),
            through=data.get("through"),
            held=list(data.get("held", ())),
        )


def _plugin(kind: str) -> StatefulKind:
    plugin = stateful_kind(kind)
    if plugin is None:
        raise ValueError(f"{kind!r} is not a stateful kind")
    return plugin


def entry_order(source_id: str) -> tuple[int, int]:
    """A source id's place in its series' delivery order: a `readings` entry id as (ms, seq),
    a Kafka record (``topic/partition/offset``; a series keeps to one partition) as
    (offset, 0); ids of another form sort first. Not cached: parsing an id costs less than
    a cache's miss (most ids are new) and about what its hit does."""
    if "/" in source_id:
        try:
            return int(source_id.rsplit("/", 1)[1]), 0
        except ValueError:
            return -1, -1
    ms, _, seq = source_id.partition("-")
    try:
        return int(ms), int(seq or 0)
    except ValueError:
        return -1, -1


def fold_order(group: Sequence[StreamReading]) -> Sequence[StreamReading]:
    """One series' readings in the order they are folded: by timestamp, ties by delivery
    order. Readings that already come in strictly increasing time (one reading, a backfill,
    a producer in order) are taken as they are, without a sort."""
    if len(group) < 2:
        return group
    stamps = [r.timestamp for r in group]
    if all(map(lt, stamps, islice(stamps, 1, None))):
        return group
    return sorted(group, key=lambda r: (r.timestamp, entry_order(r.source_id)))


# StreamReading's fields
_SOURCE_ID, _TIMESTAMP, _VALUE, _VERSION = (itemgetter(i) for i in (0, 2, 3, 4))
# States are bytes (a float row as it is): their replies are read without decoding.
_RAW_REPLY: dict[str, Any] = {NEVER_DECODE: True}
T = TypeVar("T")


# Whether a source id has been committed for good (it can never be delivered again).
Acknowledged = Callable[[str], bool]


class Below:
    """Acknowledged for a Redis group: ids below its oldest pending entry (``watermark``, an
    ``entry_order``). Monotone in the ids' order, which lets ``fold_states`` forget a state's
    folded ids at once when the newest of them is below it, and parse each fresh id once."""

    __slots__ = ("watermark",)

    def __init__(self, watermark: tuple[int, int]) -> None:
        self.watermark = watermark

    def __call__(self, source_id: str) -> bool:
        return entry_order(source_id) < self.watermark


class Folding(NamedTuple):
    """One series' result of ``fold_states``: its new state, its anomaly events (source id →
    fields, in fold order), the alerts raised for the first time, and the carriers of events
    of readings held before this batch (event source id → the batch reading that writes it)."""

    state: SeriesState
    events: dict[str, dict[str, str]]
    opened: int
    carriers: dict[str, str]


def fold_states(
    currents: Sequence[SeriesState],
    readings: Sequence[Sequence[StreamReading]],
    *,
    acknowledged: Acknowledged | None,
    detected_at: float,
    scales: Sequence[tuple[float, ...] | None] | None = None,
    lateness: int = 0,
    flush: Sequence[str] | None = None,
    fresh: bool = False,
) -> list[Folding]:
    """Fold each series' readings into its state, in place: ``readings[i]`` belong to
    ``currents[i]`` (a state whose compare-and-set then fails is discarded and read again).
    All series of one kind are folded by one call of the kind's ``fold``.

    Returns, per series, the new state, the anomaly events (source id → fields), how many
    alerts were raised for the first time and the carriers of released held readings. A
    reading already folded (a redelivery) is not folded again: its event, if it had one, is
    emitted again, the same, with those it carried. ``acknowledged`` (None: unknown) tells
    which source ids were committed for good: they are skipped and forgotten. ``scales[i]``
    (None: unknown, keep) is the feedback adjustment of series i (``Adjustment.vector()``),
    set on its state before its readings are folded (kinds with an ``adjust``, which leave a
    state that already carries it as it is). ``lateness`` is the reorder buffer's
    tolerance in event seconds (``detector.state.lateness``; 0: none, readings folded in
    timestamp order within the batch). ``flush`` (the series' ids, with no readings) folds
    every held reading now, their events carried by nobody (``SeriesStates.flush``).
    ``fresh``: every reading is delivered for the first time, each series' in delivery order
    (a Redis group's new entries, ``>``, on their first attempt): none was folded before or
    committed, so the per-reading redelivery checks are skipped and a state's id bound is
    its newest reading's.
    """
    news = list(currents)
    if scales is not None:
        adjusts: dict[str, Any] = {}  # each kind's, looked up once
        for new, wanted in zip(news, scales, strict=True):
            if wanted is not None:
                if new.kind not in adjusts:
                    adjusts[new.kind] = getattr(_plugin(new.kind), "adjust", None)
                adjust = adjusts[new.kind]
                if adjust is not None:
                    new.state = adjust(new.state, new.scales, wanted)
                    new.scales = IDENTITY_SCALES
    events: list[dict[str, dict[str, str]]] = [{} for _ in news]
    carriers: list[dict[str, str]] = [{} for _ in news]
    opened = [0] * len(news)
    fresh_ids: set[str] = set()  # readings first seen in this batch: each writes its own
    todo: list[list[StreamReading]] = []
    lates: list[list[StreamReading]] = []
    carrier_of: list[str | None] = []
    # A Redis group's watermark, compared with parsed ids (each fresh id parsed once).
    watermark = acknowledged.watermark if isinstance(acknowledged, Below) else None
    for i, (new, group) in enumerate(zip(news, readings, strict=True)):
        found = events[i]
        if acknowledged is not None:  # committed for good: never delivered again, forgotten
            if new.ids:
                if watermark is not None and new.top is not None and new.top < watermark:
                    new.ids, new.top = [], None
                else:
                    new.ids = [s for s in new.ids if not acknowledged(s)]
            if new.recent:  # an outcome is needed until its carrier is committed
                new.recent = [o for o in new.recent if not acknowledged(_carrier(o))]
        holding = lateness > 0 or bool(new.held)
        top = new.top if new.ids else None
        if watermark is not None and new.ids and top is None:  # a state written without one
            top = max(map(entry_order, new.ids))
        if fresh:  # first deliveries: nothing to recognise, nothing acknowledged
            unseen = list(group if holding else fold_order(group))
            if watermark is not None and group:
                order = entry_order(group[-1].source_id)  # the newest: delivery order
                if top is None or order > top:
                    top = order
        else:
            folded = set(new.ids)
            outcomes: dict[str, list[Any]] = {}
            carried: dict[str, list[list[Any]]] = {}
            for o in new.recent:
                outcomes[o[0]] = o
                if _carrier(o) != o[0]:
                    carried.setdefault(_carrier(o), []).append(o)
            unseen = []
            for r in group if holding else fold_order(group):
                if r.source_id in folded:  # redelivered: emit its event again, not fold again
                    for o in carried.get(r.source_id, ()):
                        found[o[0]] = _event(_held_reading(r, o), new, o, detected_at)
                        carriers[i][o[0]] = r.source_id
                    again = outcomes.get(r.source_id)
                    if again is not None:
                        found[r.source_id] = _event(r, new, again, detected_at)
                    continue
                if watermark is not None:
                    order = entry_order(r.source_id)
                    if order < watermark:
                        continue  # acknowledged: another consumer committed (and folded) it
                    if top is None or order > top:
                        top = order
                elif acknowledged is not None and acknowledged(r.source_id):
                    continue
                folded.add(r.source_id)
                unseen.append(r)
        new.ids += map(_SOURCE_ID, unseen)
        # Without a Redis group's watermark the bound is unknown (ids of other forms).
        new.top = top if watermark is not None or not new.ids else None
        fresh_ids.update(map(_SOURCE_ID, unseen))
        if holding:
            split = release(new, unseen, lateness, flush=None if flush is None else flush[i])
            todo.append(split.ready)
            lates.append(split.late)
            carrier_of.append(None if split.carrier is None else split.carrier.source_id)
        else:
            todo.append(unseen)
            lates.append([])
            carrier_of.append(None)
    by_kind: dict[str, list[int]] = defaultdict(list)
    for i, new in enumerate(news):
        if todo[i] or lates[i]:
            by_kind[new.kind].append(i)
    for kind, members in by_kind.items():
        plugin = _plugin(kind)
        flat, slots = _flatten([todo[i] for i in members])
        states, verdicts = plugin.fold([news[i].state for i in members], slots, *_columns(flat))
        for slot, i in enumerate(members):
            news[i].state = states[slot]
        for j in np.flatnonzero(verdicts.anomaly).tolist():
            r = flat[j]
            i = members[int(slots[j])]
            new = news[i]
            if verdicts.alert[j]:
                new.episode_id = r.source_id
                opened[i] += 1
            carrier = r.source_id
            held_before = carrier_of[i]
            if held_before is not None and r.source_id not in fresh_ids:
                carrier = held_before  # held by an earlier batch: written with its carrier
                carriers[i][r.source_id] = carrier
            outcome = _outcome(r, new.episode_id or r.source_id, verdicts, j)
            if carrier != r.source_id or verdicts.level is not None:
                outcome += [0, carrier, r.timestamp, r.value]  # its reading, for again
                _add_level(outcome, verdicts, j)
            new.recent.append(outcome)
            events[i][r.source_id] = _event(r, new, outcome, detected_at)
        late_members = [i for i in members if lates[i]]
        if late_members:  # scored against the states as they now stand, which are kept
            flat, slots = _flatten([lates[i] for i in late_members])
            _, verdicts = plugin.fold([news[i].state for i in late_members], slots, *_columns(flat))
            for j in np.flatnonzero(verdicts.anomaly).tolist():
                r = flat[j]
                new = news[late_members[int(slots[j])]]
                outcome = _outcome(r, new.episode_id or r.source_id, verdicts, j)
                outcome[5] = 0  # never an alert: a late reading opens no episode
                outcome += [1, r.source_id]
                if verdicts.level is not None:
                    outcome += [r.timestamp, r.value]
                    _add_level(outcome, verdicts, j)
                new.recent.append(outcome)
                events[late_members[int(slots[j])]][r.source_id] = _event(
                    r, new, outcome, detected_at
                )
        for i in members:
            news[i].count += len(todo[i])
    for new in news:
        if len(new.ids) > MAX_TRACKED:
            new.ids = new.ids[-MAX_TRACKED:]
        if len(new.recent) > MAX_TRACKED:
            new.recent = new.recent[-MAX_TRACKED:]
    return [Folding(*r) for r in zip(news, events, opened, carriers, strict=True)]


def _flatten(groups: Sequence[Sequence[StreamReading]]) -> tuple[list[StreamReading], Any]:
    flat = [r for group in groups for r in group]
    slots = np.repeat(np.arange(len(groups), dtype=np.intp), [len(g) for g in groups])
    return flat, slots


def _columns(flat: Sequence[StreamReading]) -> tuple[Any, Any]:
    n = len(flat)
    timestamps = np.fromiter(map(_TIMESTAMP, flat), dtype=np.float64, count=n)
    values = np.fromiter(map(_VALUE, flat), dtype=np.float64, count=n)
    return timestamps, values


def _carrier(outcome: list[Any]) -> str:
    """The source id whose commit writes an outcome's event (its own, unless it was held)."""
    return str(outcome[11]) if len(outcome) > 11 and outcome[11] else str(outcome[0])


def _held_reading(carrier: StreamReading, outcome: list[Any]) -> StreamReading:
    """A carried outcome's reading (its timestamp and value are kept in the outcome: the
    reading itself is not in the carrier's batch)."""
    return StreamReading(
        str(outcome[0]),
        carrier.series_id,
        int(outcome[12]),
        float(outcome[13]),
        carrier.version,
        carrier.kind,
    )


def _outcome(r: StreamReading, episode: str, v: Folded, j: int) -> list[Any]:
    return [
        r.source_id,
        float(v.expected[j]),
        float(v.std[j]),
        float(v.score[j]),
        float(v.ratio[j]),
        int(v.alert[j]),
        episode,
        TESTS[int(v.test[j])],
        float(v.lower[j]),
        float(v.upper[j]),
    ]


def _add_level(outcome: list[Any], v: Folded, j: int) -> None:
    if v.level is not None:
        outcome.append(float(v.level[j]))


def _event(
    r: StreamReading, state: SeriesState, outcome: list[Any], detected_at: float
) -> dict[str, str]:
    _, expected, std, z, ratio, onset, episode, *rest = outcome
    # Outcomes recorded before bounds were kept have no lower and upper: NaN says unknown.
    test, lower, upper = (rest + ["", float("nan"), float("nan")][len(rest) :])[:3]
    late = len(rest) > 3 and bool(rest[3])
    base = {"base_score": repr(float(rest[7]))} if len(rest) > 7 else {}
    return event_fields(
        Reading(r.source_id, r.series_id, r.timestamp, r.value),
        version=state.version,
        mean=expected,
        std=std,
        lower=lower,
        upper=upper,
        score=z,
        detected_at=detected_at,
        extra={
            "episode_id": str(episode),
            "onset": "1" if onset else "0",
            "kind": state.kind,
            "test": test,
            "expected": repr(float(expected)),
            "severity": f"{float(severity(ratio)):.1f}",
            "detector_score": repr(float(ratio)),
            **base,
            **({"late": "1"} if late else {}),
        },
    )


class SeriesStates:
    """Folds a batch's readings of stateful kinds into their series' states in Redis.

    ``readings_stream`` and ``group`` name the consumer group the readings come from: its
    oldest pending id bounds the redelivery bookkeeping (None: bounded by ``MAX_TRACKED``).
    """

    def __init__(
        self,
        client: Redis,
        store: ModelStore,
        *,
        readings_stream: str | None = None,
        group: str | None = None,
        cache_size: int = 50_000,
        namespace: str = "",
        adjustments: Adjustments | None = None,
        lateness: int = 0,
        flush_after: float | None = None,
    ) -> None:
        self.redis = client
        # The reorder buffer's tolerance, event seconds (``detector.state.lateness``; 0: none).
        self.lateness = lateness
        # Wall seconds beyond the tolerance after which a series' held readings are flushed
        # (``flush``); None: no sweep, held readings wait for the series' next readings.
        self.flush_after = flush_after
        self._flush = client.register_script(lua("state_common") + lua("flush_held"))
        # The series' feedback adjustments (None: the versions' own thresholds, always).
        self.adjustments = adjustments
        self.store = store
        self.namespace = namespace  # ``redis_keys.state_key``'s: a backfill job's own states
        self.readings_stream, self.group = readings_stream, group
        self._cas = client.register_script(lua("state_common") + lua("compare_and_set_states"))
        self._read = client.register_script(lua("read_states"))
        self._loaded = False
        self.conflicts = 0  # series folded again because another worker wrote first
        # The states this process wrote last, with their seq: folded again without a read.
        # A state another process wrote since fails the compare-and-set and is read again.
        self.cache_size = cache_size
        self._cache: OrderedDict[str, tuple[str, SeriesState]] = OrderedDict()
        self._preparing: asyncio.Task[None] | None = None

    async def fold(
        self,
        readings: Sequence[StreamReading],
        *,
        detected_at: float,
        acknowledged: Acknowledged | None = None,
        fresh: bool = False,
    ) -> tuple[dict[str, dict[str, str]], int, dict[str, str]]:
        """Events (source id → fields) of the anomalous readings, alerts raised, and the
        carriers of events of readings held by earlier batches (event source id → the
        reading of this batch whose commit writes it; ``detector.state.lateness``).

        ``acknowledged`` is the transport's word on which source ids are committed for good;
        without one, a Redis consumer group's oldest pending entry decides (when named).
        ``fresh``: the readings are first deliveries in delivery order (``fold_states``)."""
        by_series: dict[str, list[StreamReading]] = defaultdict(list)
        for r in readings:
            by_series[r.series_id].append(r)
        events: dict[str, dict[str, str]] = {}
        carriers: dict[str, str] = {}
        holding: dict[str, bool] = {}  # written series using the buffer → whether it holds
        opened = 0
        todo = list(by_series)
        cache = self._cache
        scales = await self.adjustments.resolve(todo) if self.adjustments is not None else {}
        for _ in range(MAX_ATTEMPTS):
            misses = [series_id for series_id in todo if series_id not in cache]
            stored_states, summary = await self._retry_noscript(partial(self._read_stored, misses))
            done = acknowledged
            if summary and summary.get("pending") and summary.get("min"):
                done = Below(entry_order(str(summary["min"])))
            read = {
                series_id: _split_stored(value)
                for series_id, value in zip(misses, stored_states, strict=True)
            }
            loaded: list[tuple[str, str | None, SeriesState | None, StreamReading]] = []
            for series_id in todo:
                group = by_series[series_id]
                newest = group[0] if len(group) == 1 else max(group, key=_VERSION)
                if series_id in read:
                    seq, raw = read[series_id]
                    stored = None if raw is None else SeriesState.from_bytes(raw)
                else:
                    seq, stored = cache[series_id]
                loaded.append((series_id, seq, stored, newest))
            refits = [
                (series_id, newest.version)
                for series_id, _, stored, newest in loaded
                if stored is None or stored.version < newest.version
            ]
            if refits:  # new versions' initial states: their params in one query, not one each
                await self.store.prefetch_params(refits)
            currents: list[SeriesState] = []
            seqs: list[str] = []
            written: list[str] = []
            for series_id, seq, stored, newest in loaded:
                if stored is None or stored.version < newest.version:
                    current = await self._initial(series_id, stored, newest.version, newest.kind)
                else:
                    current = stored
                if current is None:
                    continue
                currents.append(current)
                seqs.append(str(seq or "0"))
                written.append(series_id)
            todo = written
            if not todo:
                return events, opened, carriers
            results = fold_states(
                currents,
                [by_series[s] for s in todo],
                acknowledged=done,
                detected_at=detected_at,
                scales=[scales.get(s) for s in todo],
                lateness=self.lateness,
                fresh=fresh,
            )
            nexts = [int(seq) + 1 for seq in seqs]  # each written state's seq
            values = [
                b"%d\n%b" % (after, result.state.to_bytes())
                for after, result in zip(nexts, results, strict=True)
            ]
            layout = "".join(f"{seq},{len(v)};" for seq, v in zip(seqs, values, strict=True))
            keys = [state_key(s, self.namespace) for s in todo]
            reply = await self._retry_noscript(
                partial(_eval_raw, self.redis, self._cas.sha, keys, [layout, b"".join(values)])
            )
            conflicted = {int(i) - 1 for i in reply}
            for i, (new, found, n, carried) in enumerate(results):
                if i in conflicted:
                    cache.pop(todo[i], None)  # another process wrote it: read it again
                    continue
                events.update(found)
                carriers.update(carried)
                opened += n
                if new.newest is not None:
                    holding[todo[i]] = bool(new.held)
                if self.cache_size:
                    cache[todo[i]] = (str(nexts[i]), new)
                    cache.move_to_end(todo[i])
            while len(cache) > self.cache_size:
                cache.popitem(last=False)
            self.conflicts += len(conflicted)
            todo = [s for i, s in enumerate(todo) if i in conflicted]
            if not todo:
                await self._deadlines(holding)
                return events, opened, carriers
        raise RuntimeError(f"stream state of {todo} kept changing under {MAX_ATTEMPTS} tries")

    async def _read_stored(
        self, misses: list[str], *, pending: bool = True
    ) -> tuple[list[bytes | None], dict[str, Any] | None]:
        """The stored states of ``misses`` (raw, ``read_states.lua``) and, for a Redis group
        (``pending``), its pending summary, in one round trip."""
        stream, group = self.readings_stream, self.group
        grouped = bool(pending and stream and group)
        if not misses and not grouped:
            return [], None
        async with self.redis.pipeline(transaction=False) as pipe:
            if misses:
                keys = [state_key(s, self.namespace) for s in misses]
                pipe.execute_command("EVALSHA", self._read.sha, len(keys), *keys, **_RAW_REPLY)
            if grouped and stream and group:
                pipe.xpending(stream, group)
            replies = await pipe.execute()
        return (replies[0] if misses else []), (replies[-1] if grouped else None)

    async def _ensure_scripts(self) -> None:
        if not self._loaded:
            for script in (self._read, self._cas):
                await self.redis.script_load(script.script)
            self._loaded = True

    async def _retry_noscript(self, call: Callable[[], Awaitable[T]]) -> T:
        """``call`` (EVALSHA of our scripts, raw replies), once more after loading them if
        Redis lost them (a restart, SCRIPT FLUSH)."""
        await self._ensure_scripts()
        try:
            return await call()
        except NoScriptError:
            self._loaded = False
            await self._ensure_scripts()
            return await call()

    async def _deadlines(self, holding: dict[str, bool]) -> None:
        """Keep the held set: a series that holds readings is due for a flush once it has
        had no reading for the tolerance plus ``flush_after`` (pushed back by each batch);
        one that holds none leaves it. Not atomic with the states' write, and need not be: a
        missing entry is added by the series' next batch, a stale one flushes nothing."""
        if self.flush_after is None or not holding:
            return
        due = time.time() + self.lateness + self.flush_after
        key = held_key(self.namespace)
        async with self.redis.pipeline(transaction=False) as pipe:
            adds = {s: due for s, held in holding.items() if held}
            if adds:
                pipe.zadd(key, adds)
            gone = [s for s, held in holding.items() if not held]
            if gone:
                pipe.zrem(key, *gone)
            await pipe.execute()

    async def flush(self, *, anomalies: str, maxlen: int, limit: int = 100) -> list[dict[str, str]]:
        """Fold the held readings of series due in the held set (they stopped reporting) and
        write their states, events and removal from the set in one script: the events are
        carried by no reading, so the script writes them. Returns the events written (for the
        anomaly history, recorded after: its writes are idempotent)."""
        key = held_key(self.namespace)
        due = [
            s.decode() if isinstance(s, bytes) else str(s)
            for s in await self.redis.zrangebyscore(key, "-inf", time.time(), 0, limit)
        ]
        if not due:
            return []
        stored, _ = await self._retry_noscript(partial(self._read_stored, due, pending=False))
        items: list[list[Any]] = []
        keys: list[str] = []
        states: list[bytes] = []
        found: list[list[dict[str, str]]] = []
        stale = []
        for series_id, value in zip(due, stored, strict=True):
            seq, raw = _split_stored(value)
            state = None if raw is None else SeriesState.from_bytes(raw)
            if state is None or not state.held:
                stale.append(series_id)
                continue
            (result,) = fold_states(
                [state],
                [[]],
                acknowledged=None,
                detected_at=time.time(),
                lateness=self.lateness,
                flush=[series_id],
            )
            events = list(result.events.values())
            items.append(
                [str(seq or "0"), series_id, [[x for kv in e.items() for x in kv] for e in events]]
            )
            states.append(result.state.to_bytes())
            keys.append(state_key(series_id, self.namespace))
            self._cache.pop(series_id, None)
            found.append(events)
        if stale:
            await self.redis.zrem(key, *stale)
        if not items:
            return []
        written = await self._flush(
            keys=[key, anomalies, *keys], args=[maxlen, orjson.dumps(items).decode(), *states]
        )
        # A state that changed meanwhile was left, its events unwritten: its next batch (or
        # sweep) releases them.
        return [e for i in written for e in found[int(i) - 1]]

    def prepare(self) -> asyncio.Task[None]:
        """Start loading what the stateful kinds need to fold (the seasonal kind's compiled
        loop) in a thread, so that the first batch with such a series does not wait for it
        (a fold that comes first waits for the load, as without this); a failure is logged
        and left to the first fold to raise."""
        task = asyncio.create_task(asyncio.to_thread(prepare_stateful), name="prepare-kinds")
        self._preparing = task  # a reference, so the task is not collected before it ends

        def report(done: asyncio.Task[None]) -> None:
            if not done.cancelled() and done.exception() is not None:
                log.warning("preparing the stateful kinds failed: %r", done.exception())

        task.add_done_callback(report)
        return task

    async def _initial(
        self, series_id: str, stored: SeriesState | None, version: int, kind: str
    ) -> SeriesState | None:
        """The initial state of ``version``, newer than the stored one (a refit), keeping the
        stored redelivery bookkeeping; None if PostgreSQL has no initial state for it (a fit
        withdrawn after a failed commit: its readings are acknowledged without events, as for
        a series without a model)."""
        try:
            params = await self.store.params(series_id, version)
            initial = _plugin(kind).initial_state(params)
        except (ModelNotFoundError, KeyError, ValueError):
            log.warning("no initial %s state for %s v%d: skipped", kind, series_id, version)
            return None
        fresh = SeriesState(kind, version, initial)
        if stored is not None:  # keep the redelivery bookkeeping and the buffer across it
            fresh.ids, fresh.recent, fresh.top = stored.ids, stored.recent, stored.top
            fresh.newest, fresh.through, fresh.held = stored.newest, stored.through, stored.held
        return fresh


async def _eval_raw(
    client: Redis, sha: str, keys: Sequence[str], args: Sequence[str | bytes]
) -> Any:
    """EVALSHA whose reply is read without decoding (states are bytes)."""
    run: Any = client.execute_command
    return await run("EVALSHA", sha, len(keys), *keys, *args, **_RAW_REPLY)


def _split_stored(value: bytes | None) -> tuple[str | None, bytes | None]:
    """A stored state's seq and bytes (``read_states.lua``: "<seq>\\n<state>")."""
    if value is None:
        return None, None
    seq, _, raw = value.partition(b"\n")
    return seq.decode(), raw or None


async def read_state(client: Redis, series_id: str, namespace: str = "") -> SeriesState | None:
    """The series' stored streaming state (for tests and tools)."""
    script = client.register_script(lua("read_states"))
    await client.script_load(script.script)
    (value,) = await _eval_raw(client, script.sha, [state_key(series_id, namespace)], [])
    _, raw = _split_stored(value)
    return None if raw is None else SeriesState.from_bytes(raw)
