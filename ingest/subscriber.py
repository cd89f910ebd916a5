"""Tail the `anomalies` stream: from now, the start or an id; optionally as a durable group."""

from __future__ import annotations

import socket
import time
from collections.abc import Collection, Iterator
from typing import Any

import redis

from detector.wire.events import ANOMALY, decode_event, wanted


def resolve_start(client: redis.Redis, stream: str, start: str) -> str:
    """``$`` as the concrete id of the newest entry, so nothing published between two reads
    is missed (re-sending ``$`` would skip entries added in between)."""
    if start != "$":
        return start
    newest: Any = client.xrevrange(stream, count=1)
    return str(newest[0][0]) if newest else "0-0"


class Subscriber:
    """Yields anomaly events as dicts (numbers typed, plus ``id``, the event's entry id).

    ``types`` are the event types wanted: by default only anomalies (events of type
    ``anomaly``, or with no type), so code written before `no_data` events existed sees
    nothing new; ``types=("anomaly", "no_data")`` adds silent-series events, ``"incident"``
    incidents (never with ``series_id``: an incident names no series). Others are skipped
    (and, in a group, acknowledged).

    Without ``group`` it reads with XREAD and keeps its position in memory. With ``group`` it
    joins (creating it if needed, at ``start``) that consumer group and acknowledges each event
    once the caller asks for the next one: a restarted durable subscriber resumes where it
    stopped and first gets the events it had not finished.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        stream: str = "anomalies",
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
        self.stream = stream
        self.start = start
        self.series_id = series_id
        self.group = group
        self.consumer = consumer or socket.gethostname()
        self.block_ms = block_ms
        self.count = count

    def events(
        self, *, limit: int | None = None, idle_timeout: float | None = None
    ) -> Iterator[dict[str, Any]]:
        """Events as they come; stops after ``limit`` events or ``idle_timeout`` s of quiet."""
        produced = 0
        last_event = time.monotonic()
        for entry_id, fields in self._entries():
            if entry_id is None:  # a quiet period
                if idle_timeout is not None and time.monotonic() - last_event >= idle_timeout:
                    return
                continue
            last_event = time.monotonic()
            if wanted(fields, self.types, self.series_id):
                yield {"id": entry_id, **decode_event(fields)}
                produced += 1
            if self.group is not None:
                self.client.xack(self.stream, self.group, entry_id)
            if limit is not None and produced >= limit:
                return

    def _entries(self) -> Iterator[tuple[str | None, dict[str, str]]]:
        if self.group is None:
            position = resolve_start(self.client, self.stream, self.start)
            while True:
                reply: Any = self.client.xread(
                    {self.stream: position}, count=self.count, block=self.block_ms
                )
                entries = reply[0][1] if reply else []
                if not entries:
                    yield None, {}
                for entry_id, fields in entries:
                    position = entry_id
                    yield entry_id, fields
        self._ensure_group()
        position = "0"  # first what this consumer was given but did not finish
        while True:
            reply = self.client.xreadgroup(
                self.group,
                self.consumer,
                {self.stream: position},
                count=self.count,
                block=None if position != ">" else self.block_ms,
            )
            entries = reply[0][1] if reply else []
            if not entries:
                if position != ">":
                    position = ">"
                    continue
                yield None, {}
            for entry_id, fields in entries:
                if position != ">":
                    position = entry_id
                yield entry_id, fields or {}

    def _ensure_group(self) -> None:
        assert self.group is not None
        try:
            self.client.xgroup_create(self.stream, self.group, id=self.start, mkstream=True)
        except redis.exceptions.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
