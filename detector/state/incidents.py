"""Incidents: episodes of many series opening close together become one incident, one page.

An incident opens when the episodes of at least ``INCIDENT_MIN_SERIES`` distinct series open
within ``INCIDENT_WINDOW_SECONDS`` of each other in event time (their onsets' reading
timestamps, as episodes' quiet period: a replay groups the same way); later onsets within the
window of it join it; an onset past the window, or no onset joining for the window of arrival
time (Redis' clock, checked by every worker's sweep), closes it. The rule is in
``detector/scripts/incident_onsets.lua``; docs/stream-contract.md#incidents states it.

All state is in Redis, shared by every worker of a deployment (keys named after the output,
``detector.redis_keys.incident_key``): one script call per batch that has onsets (a batch
without any costs nothing), one per sweep. The scripts write the `incident` events (open,
closed) to the anomalies stream themselves on Redis Streams, or return them for the Kafka
worker to produce; either way each event waits in an outbox, leased to the worker that got
it, until that worker recorded it in PostgreSQL (and on Kafka produced it). A worker that dies
in between leaves the lease to run out, and the next sweep hands the event to another worker.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
from redis.asyncio import Redis

from detector.redis_keys import incident_key, silence_key
from detector.scripts import lua
from detector.settings import Settings

# How long a worker that got an incident event may take to record (and produce) it before
# the next sweep hands it to another worker.
LEASE_SECONDS = 30.0
# Expired leases taken per sweep call.
SWEEP_LIMIT = 1000
# How stale the summed fleet size of sharded streams may be.
FLEET_REFRESH_SECONDS = 5.0
# The keys, in the scripts' KEYS order (incident_common.lua); the output stream comes last.
_PARTS = ("current", "members", "last_members", "pending", "pending_episodes", "outbox", "leases")


@dataclass(slots=True)
class Onset:
    """An episode's first anomaly: what the grouping needs of it."""

    series_id: str
    timestamp: int
    episode_id: str


@dataclass(slots=True)
class IncidentChanges:
    """What one script call did: incidents opened by it, whether one is open now, the events
    it wrote or handed back (to record, and on Kafka to produce), and the open incident's
    state when the call joined onsets to it (to record)."""

    opened: int = 0
    active: int = 0
    events: list[dict[str, str]] = field(default_factory=list)
    state: dict[str, str] | None = None

    def rows(self) -> list[dict[str, str]]:
        """Every incident state to record in PostgreSQL (events and the joined state)."""
        return self.events + ([self.state] if self.state else [])


def onsets_of(events: Mapping[str, Mapping[str, str]]) -> list[Onset]:
    """The onsets among a batch's anomaly events (source id → fields), in batch order."""
    return [
        Onset(e["series_id"], int(e["timestamp"]), e.get("episode_id") or source_id)
        for source_id, e in events.items()
        if e.get("onset") == "1"
    ]


class IncidentTracker:
    """The incidents of one output (stream or topic), kept in Redis."""

    def __init__(
        self,
        client: Redis,
        *,
        output: str,
        source: str | None = None,
        window_seconds: int,
        min_series: int,
        min_share: float = 0.0,
        mode: Literal["xadd", "lease"] = "xadd",
        maxlen: int = 1_000_000,
        fleet: Sequence[str] | None = None,
    ) -> None:
        self.redis = client
        self.output = output
        self.source = source or output  # what PostgreSQL records them under
        self.mode = mode
        # The fleet: the series the silence watch has seen on this output's stream.
        fleet_key = silence_key(output, "series")
        self.keys = [*(incident_key(output, part) for part in _PARTS), output, fleet_key]
        # Sharded streams (``detector.shards``): the fleet is every shard's watched series,
        # hashes in other slots than the incident keys, so their sizes are summed here and
        # handed to the scripts (refreshed at most every FLEET_REFRESH_SECONDS).
        self.fleet = list(fleet or ())
        self._fleet_size = -1
        self._fleet_read = -math.inf
        self._args: list[Any] = [
            window_seconds,
            min_series,
            mode,
            maxlen,
            LEASE_SECONDS,
            repr(float(min_share)),
        ]
        shared = lua("incident_common")
        self._onsets = client.register_script(shared + lua("incident_onsets"))
        self._sweep = client.register_script(shared + lua("incident_sweep"))

    async def observe(self, onsets: Sequence[Onset]) -> IncidentChanges:
        """Group a batch's onsets (one script call; none without onsets)."""
        if not onsets:
            return IncidentChanges()
        lines = "\n".join(f"{o.series_id} {int(o.timestamp)} {o.episode_id}" for o in onsets)
        opened, active, events, state = await self._onsets(
            keys=self.keys, args=[*self._args, await self._fleet_arg(), lines]
        )
        return IncidentChanges(
            opened=int(opened),
            active=int(active),
            events=[_fields(e) for e in events],
            state=_fields(state) if state else None,
        )

    async def sweep(self) -> IncidentChanges:
        """Close an incident gone quiet; take over events whose lease ran out."""
        changes = IncidentChanges()
        while True:
            active, events = await self._sweep(
                keys=self.keys, args=[*self._args, await self._fleet_arg(), SWEEP_LIMIT]
            )
            changes.active = int(active)
            changes.events += [_fields(e) for e in events]
            if len(events) < SWEEP_LIMIT:
                return changes

    async def _fleet_arg(self) -> int:
        """The fleet's size for the scripts; -1: the script reads it (one stream)."""
        if not self.fleet:
            return -1
        now = time.monotonic()
        if now - self._fleet_read >= FLEET_REFRESH_SECONDS:
            # A non-transactional pipeline: a cluster client sends each HLEN to its node.
            async with self.redis.pipeline(transaction=False) as pipe:
                for key in self.fleet:
                    pipe.hlen(key)
                sizes = await pipe.execute()
            self._fleet_size, self._fleet_read = sum(int(n) for n in sizes), now
        return self._fleet_size

    async def delivered(self, events: Sequence[Mapping[str, str]]) -> None:
        """These events are recorded (and on Kafka produced): out of the outbox."""
        if events:
            ids = list({e["source_id"] for e in events})
            outbox, leases = self.keys[5], self.keys[6]
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hdel(outbox, *ids)
                pipe.zrem(leases, *ids)
                await pipe.execute()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _fields(flat: Any) -> dict[str, str]:
    if isinstance(flat, bytes | str):  # an outbox entry, JSON-encoded by cjson
        flat = orjson.loads(flat)
    items = [_text(v) for v in flat]
    return {items[i]: items[i + 1] for i in range(0, len(items), 2)}


def incident_tracker(
    settings: Settings,
    client: Redis,
    *,
    output: str | None = None,
    source: str | None = None,
    mode: Literal["xadd", "lease"] = "xadd",
    fleet: Sequence[str] | None = None,
) -> IncidentTracker | None:
    """The tracker a worker's settings ask for (None when ``incident_min_series`` is 0); its
    keys are named after ``output`` (default: the anomalies stream), its PostgreSQL rows
    after ``source`` (default: ``output``); ``fleet``: the silence watch's series hashes
    of every shard, when the streams are sharded."""
    if settings.incident_min_series <= 0:
        return None
    return IncidentTracker(
        client,
        output=output or settings.stream_anomalies,
        source=source,
        window_seconds=settings.incident_window_seconds,
        min_series=settings.incident_min_series,
        min_share=settings.incident_min_share if settings.silence_cadences > 0 else 0.0,
        mode=mode,
        maxlen=settings.stream_anomalies_maxlen,
        fleet=fleet,
    )
