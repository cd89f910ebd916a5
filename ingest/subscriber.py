"""Tail the `anomalies` stream, or every shard's: from now, the start or an id; optionally as
a durable group."""

from __future__ import annotations

import socket
import time
from collections.abc import Collection, Iterator, Sequence
from typing import Any, cast

import redis
from redis.typing import KeyT, StreamIdT

from detector.store.connections import is_cluster
from detector.wire.events import ANOMALY, decode_event, wanted

# On a Redis Cluster the shards' streams lie in different slots, so one read cannot block on
# them all: each round reads every shard without blocking, and waits this long when all were
# empty (the delay an event may wait for the next round).
POLL_MS = 100

# A stream entry, the stream it came from first; (stream, None, {}) marks a quiet period.
_Entry = tuple[str, str | None, dict[str, str]]


def resolve_start(client: redis.Redis, stream: str, start: str) -> str:
    """``$`` as the concrete id of the newest entry, so nothing published between two reads
    is missed (re-sending ``$`` would skip entries added in between)."""
    if start != "$":
        return start
    newest: Any = client.xrevrange(stream, count=1)
    return str(newest[0][0]) if newest else "0-0"


def start_positions(start: str, count: int) -> list[str]:
    """``start`` for each of ``count`` streams: one position (``$``, ``0`` or an id) for every
    stream, or ``count`` of them joined by ``,`` (one a stream, in order: the per-shard
    positions a merged reader resumes from exactly)."""
    parts = start.split(",")
    if len(parts) == 1:
        return parts * count
    if len(parts) != count:
        raise ValueError(
            f"start {start!r} has {len(parts)} positions for {count} streams: give one "
            "position for every stream, or one a stream joined by ','"
        )
    return parts


def _entry_order(entry: _Entry) -> tuple[int, int]:
    ms, _, seq = str(entry[1]).partition("-")
    return int(ms), int(seq or 0)


def _merged(reply: Any) -> list[_Entry]:
    """One XREAD or XREADGROUP reply of several streams as one list, by entry id: on one
    Redis the ids of every stream come from its clock, so the merged feed keeps time order
    within a read (and each stream's own order always)."""
    entries = [
        (stream, entry_id, fields or {})
        for stream, page in reply or []
        for entry_id, fields in page
    ]
    if len(reply or []) > 1:
        entries.sort(key=_entry_order)
    return entries


class Subscriber:
    """Yields anomaly events as dicts (numbers typed, plus ``id``, the event's entry id).

    ``types`` are the event types wanted: by default only anomalies (events of type
    ``anomaly``, or with no type), so code written before `no_data` events existed sees
    nothing new; ``types=("anomaly", "no_data")`` adds silent-series events, ``"incident"``
    incidents (never with ``series_id``: an incident names no series). Others are skipped
    (and, in a group, acknowledged).

    ``streams`` reads several streams as one feed (``detector.shards.anomalies_streams``: with
    STREAM_SHARDS above 1 every shard's): each event then also carries ``stream``, the stream
    its ``id`` belongs to (an id alone names no entry once there are several streams). On one
    Redis one XREAD waits on them all; on a Redis Cluster, where their keys are in different
    slots, every stream is read without blocking, in one pipeline (one round trip per master
    serving a shard), and a round that finds nothing waits ``POLL_MS`` before the next.

    Without ``group`` it reads with XREAD and keeps its position in memory. With ``group`` it
    joins (creating it if needed, at ``start``) that consumer group on every stream and
    acknowledges each event, on its own stream, once the caller asks for the next one: a
    restarted durable subscriber resumes where it stopped and first gets the events it had
    not finished.

    ``start`` is ``$`` (from now), ``0`` (everything still in the streams) or an entry id, the
    same for every stream; or one position a stream joined by ``,``, in the order of
    ``streams``.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        stream: str = "anomalies",
        streams: Sequence[str] | None = None,
        start: str = "$",
        series_id: str | None = None,
        group: str | None = None,
        consumer: str | None = None,
        block_ms: int = 2000,
        count: int = 100,
        types: Collection[str] = (ANOMALY,),
    ) -> None:
        self.client = client
        self.types = frozenset(types)
        self.streams = list(streams) if streams is not None else [stream]
        if not self.streams:
            raise ValueError("streams names no stream")
        self.stream = self.streams[0]
        self.start = start
        self.starts = start_positions(start, len(self.streams))
        self.series_id = series_id
        self.group = group
        self.consumer = consumer or socket.gethostname()
        self.block_ms = block_ms
        self.count = count
        self.merged = len(self.streams) > 1
        # One read cannot name keys of several slots: read each stream alone (see above).
        self.polled = self.merged and is_cluster(client)
        self.poll_seconds = (min(block_ms, POLL_MS) if block_ms > 0 else POLL_MS) / 1000

    def events(
        self, *, limit: int | None = None, idle_timeout: float | None = None
    ) -> Iterator[dict[str, Any]]:
        """Events as they come; stops after ``limit`` events or ``idle_timeout`` s of quiet."""
        produced = 0
        last_event = time.monotonic()
        for stream, entry_id, fields in self._entries():
            if entry_id is None:  # a quiet period
                if idle_timeout is not None and time.monotonic() - last_event >= idle_timeout:
                    return
                continue
            last_event = time.monotonic()
            if wanted(fields, self.types, self.series_id):
                event = {"id": entry_id, **decode_event(fields)}
                if self.merged:
                    event["stream"] = stream
                yield event
                produced += 1
            if self.group is not None:
                self.client.xack(stream, self.group, entry_id)
            if limit is not None and produced >= limit:
                return

    def _entries(self) -> Iterator[_Entry]:
        if self.group is None:
            yield from self._tail()
            return
        self._ensure_group()
        for stream in self.streams:
            yield from self._unfinished(stream)
        yield from self._new()

    def _tail(self) -> Iterator[_Entry]:
        positions = {
            stream: resolve_start(self.client, stream, start)
            for stream, start in zip(self.streams, self.starts, strict=True)
        }
        while True:
            if self.polled:
                entries = self._poll(positions)
            else:
                streams = cast("dict[KeyT, StreamIdT]", positions)  # a dict is invariant
                reply: Any = self.client.xread(streams, count=self.count, block=self.block_ms)
                entries = _merged(reply)
            if not entries:
                yield self.stream, None, {}
            for entry in entries:
                positions[entry[0]] = str(entry[1])
                yield entry

    def _poll(self, positions: dict[str, str]) -> list[_Entry]:
        """Every stream's entries after its position, one XRANGE a stream in one pipeline
        (XRANGE names its key where the cluster client finds it without asking the server,
        unlike XREAD); after a wait when none had any."""
        pipe = self.client.pipeline(transaction=False)
        for stream, position in positions.items():
            pipe.xrange(stream, min=f"({position}", max="+", count=self.count)
        pages: Any = pipe.execute()
        entries = [
            (stream, entry_id, fields)
            for stream, page in zip(positions, pages, strict=True)
            for entry_id, fields in page
        ]
        if not entries:
            time.sleep(self.poll_seconds)
        entries.sort(key=_entry_order)
        return entries

    def _unfinished(self, stream: str) -> Iterator[_Entry]:
        """What this consumer was given on ``stream`` but did not finish (id ``0`` on)."""
        assert self.group is not None
        position = "0"
        while True:
            reply: Any = self.client.xreadgroup(
                self.group, self.consumer, {stream: position}, count=self.count, block=None
            )
            entries = _merged(reply)
            if not entries:
                return
            for entry in entries:
                position = str(entry[1])
                yield entry

    def _new(self) -> Iterator[_Entry]:
        """Entries no consumer of the group was given yet, on every stream."""
        assert self.group is not None
        while True:
            if self.polled:
                entries: list[_Entry] = []
                for stream in self.streams:
                    reply: Any = self.client.xreadgroup(
                        self.group, self.consumer, {stream: ">"}, count=self.count, block=None
                    )
                    entries += _merged(reply)
                if not entries:
                    time.sleep(self.poll_seconds)
                entries.sort(key=_entry_order)
            else:
                reply = self.client.xreadgroup(
                    self.group,
                    self.consumer,
                    dict.fromkeys(self.streams, ">"),
                    count=self.count,
                    block=self.block_ms,
                )
                entries = _merged(reply)
            if not entries:
                yield self.stream, None, {}
            yield from entries

    def _ensure_group(self) -> None:
        assert self.group is not None
        for stream, start in zip(self.streams, self.starts, strict=True):
            try:
                self.client.xgroup_create(stream, self.group, id=start, mkstream=True)
            except redis.exceptions.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
