"""One reader of the anomaly streams (every shard's) per API process, fanned out to every SSE
client."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from redis.asyncio import Redis

from detector.errors import REDIS_ERRORS, AnomalyError, InvalidInputError
from detector.store.connections import is_cluster
from detector.wire.events import ANOMALY, decode_event, event_type, wanted

log = logging.getLogger(__name__)

StreamId = tuple[int, int]
_ENTRY_ID = re.compile(r"([0-9]{1,20})-([0-9]{1,20})")
_ID_PART_MAX = 2**64 - 1  # a Redis stream id is two unsigned 64-bit integers, ms-seq
# Below the client's 10 s socket timeout.
_BLOCK_MS = 5000
_READ_COUNT = 500
_CATCH_UP_PAGE = 100
_RETRY_SECONDS = 1.0
# The wait of a Redis Cluster feed after a round of reads that found nothing (see EventFeed).
_POLL_SECONDS = 0.1


class TooManyClientsError(AnomalyError):
    """This API process already serves as many event-stream clients as it may (HTTP 503)."""


def parse_stream_id(text: str, name: str) -> StreamId:
    """``ms-seq`` as two integers; a 422 naming ``name`` when it is not a stream entry id."""
    match = _ENTRY_ID.fullmatch(text)
    if match is None or max(int(match[1]), int(match[2])) > _ID_PART_MAX:
        raise InvalidInputError(
            f"{name} must be a stream entry id like 1700000000000-0: two decimal integers "
            f"of at most {_ID_PART_MAX}, joined by '-'"
        )
    return int(match[1]), int(match[2])


def parse_cursor(text: str, name: str, shards: int) -> list[str]:
    """A resume position (``Last-Event-ID``, ``last_id``) as one entry id a shard, canonical.

    With one shard it is an entry id. With N it is what the feed sends as a message's ``id:``,
    the N shards' positions after it joined by ``,`` (in shard order), or one entry id, taken
    as every shard's position (the ids of one Redis are its clock, so that resumes at a time:
    for a client that kept an id from before the stream was sharded). A 422 naming ``name``
    otherwise.
    """
    parts = text.split(",")
    if shards == 1 or len(parts) == 1:
        ms, seq = parse_stream_id(text, name) if shards == 1 else _cursor_part(text, name, shards)
        return [f"{ms}-{seq}"] * shards
    if len(parts) != shards:
        raise InvalidInputError(f"{name} has {len(parts)} ids: {_cursor_rule(name, shards)}")
    return ["{}-{}".format(*_cursor_part(part, name, shards)) for part in parts]


def _cursor_rule(name: str, shards: int) -> str:
    return (
        f"{name} must be a message id of this feed, {shards} stream entry ids like "
        f"1700000000000-0 joined by ',' (the position in each of the {shards} anomalies shards, "
        "in shard order), or one entry id (the same position in every shard)"
    )


def _cursor_part(part: str, name: str, shards: int) -> StreamId:
    try:
        return parse_stream_id(part, name)
    except InvalidInputError:
        raise InvalidInputError(
            f"{_cursor_rule(name, shards)}; {part!r} is not an entry id (two decimal integers "
            f"of at most {_ID_PART_MAX}, joined by '-')"
        ) from None


def format_id(entry: StreamId) -> str:
    return f"{entry[0]}-{entry[1]}"


def format_body(fields: dict[str, str]) -> str:
    """A message's lines after its ``id:``: the stream event's fields as JSON, named by the
    event's type (`event: anomaly`, `event: no_data`)."""
    data = orjson.dumps(decode_event(fields)).decode()
    return f"event: {event_type(fields)}\ndata: {data}\n\n"


def format_sse(entry_id: str, fields: dict[str, str]) -> str:
    """One message carrying the stream event's fields as JSON, ``entry_id`` its SSE id."""
    return f"id: {entry_id}\n{format_body(fields)}"


@dataclass(frozen=True, slots=True)
class Message:
    """One entry of the live feed as its clients get it, formatted once for all of them.

    ``cursor`` is the feed's position in every shard once the entry was put on the queues:
    every entry at or below it reached each client's queue before this one (or was in the
    range the client caught up on), so it is the message's SSE id (with one shard, the entry
    id). ``body`` serves a client whose own position is ahead of the feed's in some shard.
    """

    shard: int
    entry: StreamId
    cursor: tuple[StreamId, ...]
    text: str  # the whole message, ``id: <cursor>`` first
    body: str


@dataclass(eq=False)
class Subscriber:
    """One SSE client: the feed puts a ``Message`` on its queue, ``None`` when the feed lost
    Redis. ``dropped`` is set when the queue was full: the client ends once it has sent what
    is queued, and resumes by Last-Event-ID."""

    series_id: str | None
    queue: asyncio.Queue[Message | None]
    dropped: bool = False
    types: frozenset[str] = frozenset({ANOMALY})  # the event types it asked for


@dataclass(eq=False)
class EventFeed:
    """One reader of the anomaly streams (started by the first client), each entry formatted
    once and put on the queue of every client that wants it.

    ``streams`` are every shard's anomalies stream (``detector.shards.anomalies_streams``; one
    without sharding), read as one feed: on one Redis one ``XREAD BLOCK`` of them all; on a
    Redis Cluster, where a read may not name keys of several slots, one ``XRANGE`` a shard
    after its position in one pipeline (one round trip per master), again at once while there
    were entries and after ``_POLL_SECONDS`` otherwise. Blocking reads a shard would hold a
    connection a shard and a task each; the pipeline costs one request a master every tenth of
    a second when idle and that much latency at most, whatever the number of clients.

    A client whose queue is full is dropped rather than slowing the others. ``reader`` is a
    client of its own (the blocking read holds its connection); ``redis`` is the shared one,
    used for the short reads of joining clients.
    """

    reader: Redis
    redis: Redis
    streams: Sequence[str]
    max_clients: int
    queue_size: int
    subscribers: set[Subscriber] = field(default_factory=set)
    # The last entry of each shard put on the queues.
    positions: list[str] = field(default_factory=list)
    _ids: list[StreamId] = field(default_factory=list, init=False)
    _shard_of: dict[str, int] = field(default_factory=dict, init=False)
    _polled: bool = field(default=False, init=False)
    _task: asyncio.Task[None] | None = field(default=None, init=False)
    _starting: asyncio.Lock = field(default_factory=asyncio.Lock, init=False)

    def __post_init__(self) -> None:
        self.streams = list(self.streams)
        if not self.streams:
            raise ValueError("an event feed needs a stream")
        self._shard_of = {stream: k for k, stream in enumerate(self.streams)}
        self._polled = len(self.streams) > 1 and is_cluster(self.reader)
        self._set_positions(self.positions or ["0-0"] * len(self.streams))

    @property
    def shards(self) -> int:
        return len(self.streams)

    async def join(
        self, series_id: str | None, types: frozenset[str] = frozenset({ANOMALY})
    ) -> tuple[Subscriber, list[str]]:
        """A new subscriber and the feed's positions (one a shard) when it joined: every
        entry after them reaches its queue. Raises TooManyClientsError, or a Redis error when
        the feed cannot start."""
        if len(self.subscribers) >= self.max_clients:
            raise TooManyClientsError(
                f"this API process serves at most {self.max_clients} event-stream clients; "
                "retry in a few seconds"
            )
        async with self._starting:
            if self._task is None:
                self._set_positions(await self.newest())
                self._task = asyncio.create_task(self._run(), name="anomaly-event-feed")
        subscriber = Subscriber(series_id, asyncio.Queue(self.queue_size), types=types)
        self.subscribers.add(subscriber)
        return subscriber, list(self.positions)

    def leave(self, subscriber: Subscriber) -> None:
        self.subscribers.discard(subscriber)

    async def newest(self) -> list[str]:
        """Each shard's newest entry id (``0-0`` for an empty or missing stream)."""
        pages: list[Any]
        if self.shards == 1:
            pages = [await self.redis.xrevrange(self.streams[0], count=1)]
        else:
            pipe = self.redis.pipeline(transaction=False)
            for stream in self.streams:
                pipe.xrevrange(stream, count=1)
            pages = await pipe.execute()
        return [str(page[0][0]) if page else "0-0" for page in pages]

    async def catch_up(
        self,
        after: Sequence[str],
        until: Sequence[str],
        series_id: str | None,
        types: frozenset[str] = frozenset({ANOMALY}),
    ) -> AsyncIterator[str]:
        """The messages of the entries after ``after`` up to ``until`` (inclusive), one
        position of each a shard, a page a shard at a time, merged by entry id (the time of
        one Redis); each message's id is the positions after it."""
        position = list(after)
        last = [parse_stream_id(p, "after") for p in after]
        ends = [parse_stream_id(p, "until") for p in until]
        pending: list[deque[tuple[str, dict[str, str]]]] = [deque() for _ in self.streams]
        open_ = [low < high for low, high in zip(last, ends, strict=True)]
        while True:
            refill = [k for k in range(self.shards) if open_[k] and not pending[k]]
            if refill:
                # An empty queue of a shard: everything read from it was sent, so its page
                # starts after its position.
                pages = await _ranges(
                    self.redis,
                    [
                        (self.streams[k], f"({position[k]}", until[k], _CATCH_UP_PAGE)
                        for k in refill
                    ],
                )
                for k, page in zip(refill, pages, strict=True):
                    pending[k].extend(page)
                    open_[k] = len(page) == _CATCH_UP_PAGE
            heads = [k for k in range(self.shards) if pending[k]]
            if not heads:
                return
            k = min(heads, key=lambda h: parse_stream_id(pending[h][0][0], "entry id"))
            entry_id, fields = pending[k].popleft()
            position[k] = entry_id
            if wanted(fields, types, series_id):
                yield format_sse(entry_id if self.shards == 1 else ",".join(position), fields)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.reader.aclose()

    def _set_positions(self, positions: list[str]) -> None:
        self.positions = list(positions)
        self._ids = [parse_stream_id(p, "position") for p in positions]

    async def _run(self) -> None:
        while True:
            try:
                entries = await self._read()
            except REDIS_ERRORS as exc:
                log.warning("anomaly event feed: Redis read failed: %s", exc)
                self._end_all()
                await asyncio.sleep(_RETRY_SECONDS)
                continue
            for shard, entry_id, fields in entries:
                self.positions[shard] = entry_id
                self._ids[shard] = parse_stream_id(entry_id, "entry id")
                self._dispatch(shard, entry_id, fields)

    async def _read(self) -> list[tuple[int, str, dict[str, str]]]:
        """The next entries after the feed's positions, of every shard, by entry id."""
        if self._polled:
            pages = await _ranges(
                self.reader,
                [
                    (stream, f"({position}", "+", _READ_COUNT)
                    for stream, position in zip(self.streams, self.positions, strict=True)
                ],
            )
            entries = [
                (k, entry_id, fields) for k, page in enumerate(pages) for entry_id, fields in page
            ]
            if not entries:
                await asyncio.sleep(_POLL_SECONDS)
        else:
            reply: Any = await self.reader.xread(
                dict(zip(self.streams, self.positions, strict=True)),
                count=_READ_COUNT,
                block=_BLOCK_MS,
            )
            entries = [
                (self._shard_of[stream], entry_id, fields)
                for stream, page in reply or []
                for entry_id, fields in page
            ]
        if self.shards > 1:
            entries.sort(key=lambda e: parse_stream_id(e[1], "entry id"))
        return entries

    def _dispatch(self, shard: int, entry_id: str, fields: dict[str, str]) -> None:
        message: Message | None = None
        for subscriber in list(self.subscribers):
            if not wanted(fields, subscriber.types, subscriber.series_id):
                continue
            if message is None:  # formatted once, for every client that wants it
                body = format_body(fields)
                cursor = entry_id if self.shards == 1 else ",".join(self.positions)
                message = Message(
                    shard, self._ids[shard], tuple(self._ids), f"id: {cursor}\n{body}", body
                )
            try:
                subscriber.queue.put_nowait(message)
            except asyncio.QueueFull:
                subscriber.dropped = True
                self.subscribers.discard(subscriber)

    def _end_all(self) -> None:
        """Every client ends with an error event (they resume by Last-Event-ID)."""
        for subscriber in list(self.subscribers):
            self.subscribers.discard(subscriber)
            try:
                subscriber.queue.put_nowait(None)
            except asyncio.QueueFull:
                subscriber.dropped = True


async def _ranges(client: Redis, ranges: list[tuple[str, str, str, int]]) -> list[Any]:
    """``XRANGE stream min max COUNT count`` for each range, in one round trip (a pipeline,
    which a cluster client sends as one a master). XRANGE names its key where a cluster
    client finds it without asking the server, as it must for XREAD."""
    if len(ranges) == 1:
        stream, low, high, count = ranges[0]
        return [await client.xrange(stream, min=low, max=high, count=count)]
    pipe = client.pipeline(transaction=False)
    for stream, low, high, count in ranges:
        pipe.xrange(stream, min=low, max=high, count=count)
    return list(await pipe.execute())
