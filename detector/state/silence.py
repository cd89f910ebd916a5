"""Silent series: a fitted series that stops reporting gets a `no_data` event, once.

A series is watched once a reading of it with a model has been scored. Its **cadence** is the
median interval of its fit's timestamps (stored with the version, ``params["cadence"]``); for
versions fitted before that was stored, the observed spacing of its streamed readings. It is
**silent** when no reading arrived for ``max(SILENCE_MIN_SECONDS, SILENCE_CADENCES × cadence)``
of arrival time (Redis' clock, the same for every worker), not event time: a replay of old
readings is not silent while it streams.

All state is in Redis, shared by every worker of both transports (keys named after the output,
``detector.redis_keys.silence_key``): a sorted set of deadlines, updated for a whole batch in
one script call (``observe_silence.lua``); a periodic sweep in every worker claims overdue
series with one script (``claim_silent.lua``) that removes them from the deadlines, marks them
silent and writes the open event, so one event per silence whatever the number of workers,
and a restarted worker loses nothing. The next reading of a silent series closes it: a second
`no_data` event, ``state=closed``, committed with that reading.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
from redis.asyncio import Redis

from detector.errors import ModelNotFoundError, StoreUnavailableError
from detector.redis_keys import silence_key
from detector.scripts import lua
from detector.settings import Settings
from detector.store.models import ModelStore

log = logging.getLogger(__name__)
# Series a process remembers having told the watch about (then it forgets them all).
_TOLD_MAX = 1_000_000

# Series claimed per script call; a sweep calls again while a call fills it.
SWEEP_LIMIT = 1000
# Kafka: how long a claimed silence may wait for the broker's acknowledgement before the next
# sweep claims it again (the claiming worker died in between).
LEASE_SECONDS = 30.0
# The fit cadence sent when the version stored none (fitted before cadences were stored).
_NO_FIT_CADENCE = -1.0


def silence_threshold(cadence: float, cadences: float, floor: float) -> float | None:
    """Seconds without a reading after which a series of ``cadence`` is silent: ``cadences``
    of its cadence, at least ``floor``; None when unwatched (no cadence, or the watch off).
    The scripts apply the same rule (``silence_events.lua``)."""
    if cadences <= 0 or not cadence > 0:
        return None
    return max(floor, cadences * cadence)


@dataclass(slots=True)
class SeriesSeen:
    """One series' readings in a batch: what the watch needs of them."""

    series_id: str
    version: int
    first_timestamp: int
    low: int
    high: int
    count: int
    first_source_id: str


@dataclass(slots=True)
class Sweep:
    """One sweep's result: silences claimed, the series silent now, and (lease mode) the open
    events the caller must deliver."""

    claimed: int = 0
    silent: int = 0
    events: list[dict[str, str]] = field(default_factory=list)


class SilenceWatch:
    """The silent-series watch of one output (stream or topic) in Redis."""

    def __init__(
        self,
        client: Redis,
        store: ModelStore,
        *,
        output: str,
        cadences: float,
        floor: float,
        mode: Literal["xadd", "lease"] = "xadd",
        maxlen: int = 1_000_000,
    ) -> None:
        self.store = store
        self.output = output
        self.cadences, self.floor, self.mode, self.maxlen = cadences, floor, mode, maxlen
        self.keys = {
            part: silence_key(output, part)
            for part in ("deadlines", "series", "silent", "resumed", "leases")
        }
        shared = lua("silence_events")
        self._observe = client.register_script(shared + lua("observe_silence"))
        self._claim = client.register_script(shared + lua("claim_silent"))
        self.redis = client
        # Per series this process told the watch about: its version, and when (monotonic)
        # its deadline must be pushed again. Every threshold is at least the floor, so a
        # deadline pushed at most a tenth of the floor late is at most that early: a series
        # reporting thousands of times a minute costs a script entry every few seconds, not
        # one a reading.
        self.slack = 0.1 * floor
        self._told: dict[str, tuple[int, float]] = {}

    async def observe(self, seen: Sequence[SeriesSeen]) -> list[dict[str, str]]:
        """Record that ``seen`` reported; returns the closed events of those that were silent
        (to be committed with the batch). One script call, a second only for series new to
        the watch or refitted (their fit cadence is looked up in between)."""
        now = time.monotonic()
        told = self._told
        seen = [
            s
            for s in seen
            if (known := told.get(s.series_id)) is None or known[0] != s.version or known[1] <= now
        ]
        if not seen:
            return []
        closed = await self._observe_due(seen)
        if self.slack > 0:
            if len(told) > _TOLD_MAX:
                told.clear()
            # A series that just resumed is told again next time: a retried batch gets its
            # closed event again (the script keeps it for the resuming reading).
            resumed = {e.get("series_id") for e in closed}
            for s in seen:
                if s.series_id not in resumed:
                    told[s.series_id] = (s.version, now + self.slack)
        return closed

    async def _observe_due(self, seen: Sequence[SeriesSeen]) -> list[dict[str, str]]:
        need, closed = await self._call_observe([self._item(s, 0.0) for s in seen])
        if need:
            wanted = set(need)
            new = [s for s in seen if s.series_id in wanted]
            try:  # their versions' params in one query (not one per series)
                await self.store.prefetch_params([(s.series_id, s.version) for s in new])
                again = [self._item(s, await self._fit_cadence(s)) for s in new]
            except StoreUnavailableError as exc:
                # PostgreSQL down: scoring goes on; these series join the watch at a later
                # batch, when their cadence can be read (the next one asks again).
                log.warning("silence watch: fit cadences unavailable, retried later: %s", exc)
                return closed
            _, more = await self._call_observe(again)
            closed += more
        return closed

    async def sweep(self) -> Sweep:
        """Claim every overdue series (``SWEEP_LIMIT`` a call); in ``xadd`` mode the script
        writes the open events, in ``lease`` mode they are returned (and leased)."""
        k = self.keys
        out = k["leases"] if self.mode == "lease" else self.output
        extra = LEASE_SECONDS if self.mode == "lease" else self.maxlen
        result = Sweep()
        while True:
            claimed, due, silent, events = await self._claim(
                keys=[k["deadlines"], k["series"], k["silent"], out],
                args=[SWEEP_LIMIT, self.cadences, self.mode, extra, self.floor],
            )
            result.claimed += int(claimed)
            result.silent = int(silent)
            result.events += [_fields(e) for e in events]
            if int(due) < SWEEP_LIMIT:
                return result

    async def delivered(self, events: Sequence[dict[str, str]]) -> None:
        """Lease mode: the broker acknowledged these open events; drop their leases."""
        if events:
            await self.redis.zrem(self.keys["leases"], *{e["series_id"] for e in events})

    async def _call_observe(self, items: list[list[Any]]) -> tuple[list[str], list[dict[str, str]]]:
        k = self.keys
        need, closed = await self._observe(
            keys=[k["deadlines"], k["series"], k["silent"], k["resumed"], k["leases"]],
            args=[self.cadences, self.floor, orjson.dumps(items).decode()],
        )
        return [_text(s) for s in need], [_fields(e) for e in closed]

    @staticmethod
    def _item(s: SeriesSeen, fit_cadence: float) -> list[Any]:
        return [
            s.series_id,
            s.version,
            s.first_timestamp,
            s.low,
            s.high,
            s.count,
            s.first_source_id,
            fit_cadence,
        ]

    async def _fit_cadence(self, s: SeriesSeen) -> float:
        """The version's stored fit cadence, or ``_NO_FIT_CADENCE`` (older versions, or
        a version PostgreSQL does not know)."""
        try:
            params = await self.store.params(s.series_id, s.version)
        except ModelNotFoundError:
            return _NO_FIT_CADENCE
        cadence = params.get("cadence")
        return (
            float(cadence) if isinstance(cadence, int | float) and cadence > 0 else _NO_FIT_CADENCE
        )


def seen_series(
    source_ids: Sequence[str],
    series_ids: Sequence[str],
    timestamps: Sequence[int],
    versions: Sequence[int | None],
) -> list[SeriesSeen]:
    """Group a batch's readings that have a model (``versions[i]`` not None) by series, in
    order of first appearance."""
    found: dict[str, SeriesSeen] = {}
    for source_id, series_id, ts, version in zip(
        source_ids, series_ids, timestamps, versions, strict=True
    ):
        if version is None:
            continue
        s = found.get(series_id)
        if s is None:
            found[series_id] = SeriesSeen(series_id, version, ts, ts, ts, 1, source_id)
            continue
        s.count += 1
        s.low, s.high = min(s.low, ts), max(s.high, ts)
        s.version = max(s.version, version)
    return list(found.values())


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _fields(flat: Sequence[Any]) -> dict[str, str]:
    return {_text(flat[i]): _text(flat[i + 1]) for i in range(0, len(flat), 2)}


def silence_watch(
    settings: Settings,
    client: Redis,
    store: ModelStore,
    *,
    output: str | None = None,
    mode: Literal["xadd", "lease"] = "xadd",
) -> SilenceWatch | None:
    """The watch a worker's settings ask for (None when ``silence_cadences`` is 0); its keys
    are named after ``output`` (default: the anomalies stream)."""
    if settings.silence_cadences <= 0:
        return None
    return SilenceWatch(
        client,
        store,
        output=output or settings.stream_anomalies,
        cadences=settings.silence_cadences,
        floor=settings.silence_min_seconds,
        mode=mode,
        maxlen=settings.stream_anomalies_maxlen,
    )
