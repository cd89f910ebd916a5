"""The multiscale kind in the stream: one state per series in Redis, updated with compare-and-set.

Each series whose latest model is ``multiscale`` has a hash ``state:{<series_id>}`` with two
fields: ``seq`` (a sequence number, bumped by every write) and ``data`` (``SeriesState`` as
JSON, ~1 KB: the version it belongs to, the ``MultiscaleState``, the count of readings folded,
the current episode and the bookkeeping that makes redelivery safe).

Per batch, the worker loads the states of the batch's multiscale series in one pipeline (with
the group's oldest pending entry id), runs ``MultiscaleState.update`` over each series'
readings in timestamp order, and writes all the states back with one Lua compare-and-set: a
state is written only if its ``seq`` is still the one read. A series whose state another worker
changed meanwhile is loaded and folded again (its readings onto the other worker's result), so
two workers never lose each other's updates; the other series of the batch are kept.

**Redelivery.** A reading is folded once. The state remembers the source ids it folded that
may still come back (``ids``), and the outcomes of its anomalous ones (``recent``): a reading
found there is not folded again, and if it was anomalous its event is emitted again, the same
(the commit script writes an event only for an entry still pending, so nothing is doubled). An
entry id below the group's oldest pending entry has been acknowledged and can never be
delivered again, so such ids are dropped from the state at each write (bounded memory); a
reading whose id is already below it was committed by another consumer and is skipped.

**Versions.** The state carries its version. When the series' latest version is newer (a
refit), the state starts again from that version's initial state (fitted on its training data,
stored in ``model_versions.params``); when the state is newer than the version a worker
resolved (its cached latest pointer is a little stale), the readings are folded into the newer
state. Readings that pin a version are scored by that version's stateless rule instead.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from redis.asyncio import Redis

from detector.errors import ModelNotFoundError
from detector.kinds.multiscale import MultiscaleKind, MultiscaleState
from detector.redis_keys import state_key
from detector.scripts import lua
from detector.store.models import ModelStore
from detector.wire.events import event_fields
from detector.wire.readings import Reading

log = logging.getLogger(__name__)

MULTISCALE = MultiscaleKind()


# A conflict means another worker wrote the series meanwhile; each retry makes progress for
# somebody, so running out means something is badly wrong.
MAX_ATTEMPTS = 1000
# Safety bound on the redelivery bookkeeping of one series (normally a few batches' worth).
MAX_TRACKED = 100_000


@dataclass(frozen=True, slots=True)
class StreamReading:
    """A reading whose resolved (latest) model is multiscale."""

    source_id: str
    series_id: str
    timestamp: int
    value: float
    version: int


@dataclass(slots=True)
class SeriesState:
    """What ``state:{<series_id>}`` holds."""

    version: int
    state: MultiscaleState
    count: int = 0  # readings folded into this version's state
    episode_id: str | None = None  # the source id of the latest alert
    ids: list[str] = field(default_factory=list)  # folded ids that may still be redelivered
    # Anomalous outcomes for re-emission: [source_id, mean, std, z, score, onset, episode_id]
    recent: list[list[Any]] = field(default_factory=list)

    def to_json(self) -> str:
        return orjson.dumps(
            {
                "version": self.version,
                "count": self.count,
                "episode_id": self.episode_id,
                "ids": self.ids,
                "recent": self.recent,
                "state": self.state.to_dict(),
            }
        ).decode()

    @classmethod
    def from_json(cls, raw: str | bytes) -> SeriesState:
        data = orjson.loads(raw)
        return cls(
            version=int(data["version"]),
            state=MultiscaleState.from_dict(data["state"]),
            count=int(data["count"]),
            episode_id=data["episode_id"],
            ids=list(data["ids"]),
            recent=list(data["recent"]),
        )


def entry_order(source_id: str) -> tuple[int, int]:
    """A source id's place in its series' delivery order: a `readings` entry id as (ms, seq),
    a Kafka record (``topic/partition/offset``; a series keeps to one partition) as
    (offset, 0); ids of another form sort first."""
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


# Whether a source id has been committed for good (it can never be delivered again).
Acknowledged = Callable[[str], bool]


def below(watermark: tuple[int, int]) -> Acknowledged:
    """Acknowledged for a Redis group: ids below its oldest pending entry."""
    return lambda source_id: entry_order(source_id) < watermark


def fold_series(
    current: SeriesState,
    readings: Sequence[StreamReading],
    *,
    acknowledged: Acknowledged | None,
    detected_at: float,
) -> tuple[SeriesState, dict[str, dict[str, str]], int]:
    """Fold one series' readings (in timestamp order) into a copy of its state, through the
    kind's ``fold`` (``detector.kinds.multiscale.MultiscaleKind``).

    Returns the new state, the anomaly events (source id → fields) and how many alerts were
    raised for the first time. ``acknowledged`` (None: unknown) tells which source ids were
    committed for good: they are skipped and forgotten.
    """
    new = SeriesState(
        current.version,
        current.state.copy(),
        current.count,
        current.episode_id,
        list(current.ids),
        [list(r) for r in current.recent],
    )
    folded = set(new.ids)
    outcomes = {r[0]: r for r in new.recent}
    events: dict[str, dict[str, str]] = {}
    opened = 0
    state = new.state
    k_point = state.params.k_point
    kind = MULTISCALE
    for r in sorted(readings, key=lambda r: (r.timestamp, entry_order(r.source_id))):
        if r.source_id in folded:  # redelivered: emit its event again, do not fold again
            again = outcomes.get(r.source_id)
            if again is not None:
                events[r.source_id] = _event(r, new.version, again, k_point, detected_at)
            continue
        if acknowledged is not None and acknowledged(r.source_id):
            continue  # already acknowledged: another consumer committed (and folded) it
        verdict = kind.fold(state, r.timestamp, r.value)
        new.count += 1
        new.ids.append(r.source_id)
        folded.add(r.source_id)
        if verdict.anomaly:
            if verdict.alert:
                new.episode_id = r.source_id
                opened += 1
            episode = new.episode_id or r.source_id
            outcome = [
                r.source_id,
                verdict.expected,
                verdict.std,
                verdict.score,
                verdict.severity,
                int(verdict.alert),
                episode,
                verdict.test,
            ]
            new.recent.append(outcome)
            outcomes[r.source_id] = outcome
            events[r.source_id] = _event(r, new.version, outcome, k_point, detected_at)
    if acknowledged is not None:
        new.ids = [i for i in new.ids if not acknowledged(i)]
        new.recent = [o for o in new.recent if not acknowledged(o[0])]
    new.ids = new.ids[-MAX_TRACKED:]
    new.recent = new.recent[-MAX_TRACKED:]
    return new, events, opened


def _event(
    r: StreamReading, version: int, outcome: list[Any], k_point: float, detected_at: float
) -> dict[str, str]:
    _, mean, std, z, score, onset, episode, *test = outcome
    return event_fields(
        Reading(r.source_id, r.series_id, r.timestamp, r.value),
        version=version,
        mean=mean,
        std=std,
        lower=mean - k_point * std,
        upper=mean + k_point * std,
        score=z,
        detected_at=detected_at,
        extra={
            "episode_id": str(episode),
            "onset": "1" if onset else "0",
            "kind": "multiscale",
            "test": test[0] if test else "",
            "detector_score": repr(float(score)),
        },
    )


class MultiscaleStreams:
    """Folds a batch's multiscale readings into their series' states in Redis.

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
    ) -> None:
        self.redis = client
        self.store = store
        self.readings_stream, self.group = readings_stream, group
        self._cas = client.register_script(lua("compare_and_set_states"))
        self.conflicts = 0  # series folded again because another worker wrote first

    async def fold(
        self,
        readings: Sequence[StreamReading],
        *,
        detected_at: float,
        acknowledged: Acknowledged | None = None,
    ) -> tuple[dict[str, dict[str, str]], int]:
        """Events (source id → fields) of the anomalous readings, and alerts raised.

        ``acknowledged`` is the transport's word on which source ids are committed for good;
        without one, a Redis consumer group's oldest pending entry decides (when named)."""
        by_series: dict[str, list[StreamReading]] = defaultdict(list)
        for r in readings:
            by_series[r.series_id].append(r)
        events: dict[str, dict[str, str]] = {}
        opened = 0
        todo = list(by_series)
        for _ in range(MAX_ATTEMPTS):
            async with self.redis.pipeline(transaction=False) as pipe:
                for series_id in todo:
                    pipe.hmget(state_key(series_id), "seq", "data")
                if self.readings_stream and self.group:
                    pipe.xpending(self.readings_stream, self.group)
                replies = await pipe.execute()
            done = acknowledged
            if self.readings_stream and self.group:
                summary = replies.pop()
                if summary and summary.get("pending") and summary.get("min"):
                    done = below(entry_order(str(summary["min"])))
            results = []
            args: list[str] = []
            written: list[str] = []
            for series_id, (seq, raw) in zip(todo, replies, strict=True):
                group = by_series[series_id]
                current = await self._current(series_id, raw, max(r.version for r in group))
                if current is None:
                    continue
                new, found, n = fold_series(
                    current, group, acknowledged=done, detected_at=detected_at
                )
                results.append((found, n))
                written.append(series_id)
                args += [str(seq or "0"), new.to_json()]
            todo = written
            if not todo:
                return events, opened
            reply = await self._cas(keys=[state_key(s) for s in todo], args=args)
            conflicted = {int(i) - 1 for i in reply}
            for i, (found, n) in enumerate(results):
                if i not in conflicted:
                    events.update(found)
                    opened += n
            self.conflicts += len(conflicted)
            todo = [s for i, s in enumerate(todo) if i in conflicted]
            if not todo:
                return events, opened
        raise RuntimeError(f"multiscale state of {todo} kept changing under {MAX_ATTEMPTS} tries")

    async def _current(
        self, series_id: str, raw: str | bytes | None, version: int
    ) -> SeriesState | None:
        """The stored state, or the initial state of ``version`` if that is newer (a refit);
        None if PostgreSQL has no initial state for it (a fit withdrawn after a failed commit:
        its readings are acknowledged without events, as for a series without a model)."""
        if raw is not None:
            stored = SeriesState.from_json(raw)
            if stored.version >= version:
                return stored
        try:
            params = await self.store.params(series_id, version)
            initial = MULTISCALE.initial_state(params)
        except (ModelNotFoundError, KeyError):
            log.warning("no initial multiscale state for %s v%d: skipped", series_id, version)
            return None
        fresh = SeriesState(version, initial)
        if raw is not None:  # keep the redelivery bookkeeping across the refit
            fresh.ids, fresh.recent = stored.ids, stored.recent
        return fresh


async def read_state(client: Redis, series_id: str) -> SeriesState | None:
    """The series' stored streaming state (for tests and tools)."""
    raw = await client.hget(state_key(series_id), "data")
    return None if raw is None else SeriesState.from_json(raw)
