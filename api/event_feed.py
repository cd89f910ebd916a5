"""One reader of the anomaly stream per API process, fanned out to every SSE client."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from redis.asyncio import Redis

from detector.errors import REDIS_ERRORS, AnomalyError, InvalidInputError
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


def format_sse(entry_id: str, fields: dict[str, str]) -> str:
    """One message carrying the stream event's fields as JSON, named by the event's type
    (`event: anomaly`, `event: no_data`)."""
    data = orjson.dumps(decode_event(fields)).decode()
    return f"id: {entry_id}\nevent: {event_type(fields)}\ndata: {data}\n\n"


@dataclass(eq=False)
class Subscriber:
    """One SSE client: the feed puts ``(id, message)`` on its queue, ``None`` when the feed
    lost Redis. ``dropped`` is set when the queue was full: the client ends once it has sent
    what is queued, and resumes by Last-Event-ID."""

    series_id: str | None
    queue: asyncio.Queue[tuple[StreamId, str] | None]
    dropped: bool = False
    types: frozenset[str] = frozenset({ANOMALY})  # the event types it asked for


@dataclass(eq=False)
class EventFeed:
    """One ``XREAD BLOCK`` loop on the anomaly stream (started by the first client), each
    entry formatted once and put on the queue of every client that wants it.

    A client whose queue is full is dropped rather than slowing the others. ``reader`` is a
    client of its own (the blocking read holds its connection); ``redis`` is the shared one,
    used for the short reads of joining clients.
    """

    reader: Redis
    redis: Redis
    stream: str
    max_clients: int
    queue_size: int
    subscribers: set[Subscriber] = field(default_factory=set)
    position: str = "0-0"  # the last entry put on the queues
    _task: asyncio.Task[None] | None = field(default=None, init=False)
    _starting: asyncio.Lock = field(default_factory=asyncio.Lock, init=False)

    async def join(
        self, series_id: str | None, types: frozenset[str] = frozenset({ANOMALY})
    ) -> tuple[Subscriber, str]:
        """A new subscriber and the feed's position when it joined: every entry after that
        position reaches its queue. Raises TooManyClientsError, or a Redis error when the feed
        cannot start."""
        if len(self.subscribers) >= self.max_clients:
            raise TooManyClientsError(
                f"this API process serves at most {self.max_clients} event-stream clients; "
                "retry in a few seconds"
            )
        async with self._starting:
            if self._task is None:
                self.position = await self.newest_id()
                self._task = asyncio.create_task(self._run(), name="anomaly-event-feed")
        subscriber = Subscriber(series_id, asyncio.Queue(self.queue_size), types=types)
        self.subscribers.add(subscriber)
        return subscriber, self.position

    def leave(self, subscriber: Subscriber) -> None:
        self.subscribers.discard(subscriber)

    async def newest_id(self) -> str:
        newest: Any = await self.redis.xrevrange(self.stream, count=1)
        return str(newest[0][0]) if newest else "0-0"

    async def catch_up(
        self,
        after: str,
        until: str,
        series_id: str | None,
        types: frozenset[str] = frozenset({ANOMALY}),
    ) -> AsyncIterator[tuple[StreamId, str]]:
        """The entries after ``after`` up to ``until`` (inclusive), a page at a time."""
        while True:
            page: Any = await self.redis.xrange(
                self.stream, min=f"({after}", max=until, count=_CATCH_UP_PAGE
            )
            for entry_id, fields in page:
                if wanted(fields, types, series_id):
                    yield parse_stream_id(entry_id, "entry id"), format_sse(entry_id, fields)
            if len(page) < _CATCH_UP_PAGE:
                return
            after = page[-1][0]

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.reader.aclose()

    async def _run(self) -> None:
        while True:
            try:
                reply: Any = await self.reader.xread(
                    {self.stream: self.position}, count=_READ_COUNT, block=_BLOCK_MS
                )
            except REDIS_ERRORS as exc:
                log.warning("anomaly event feed: Redis read failed: %s", exc)
                self._end_all()
                await asyncio.sleep(_RETRY_SECONDS)
                continue
            for entry_id, fields in reply[0][1] if reply else []:
                self.position = entry_id
                self._dispatch(entry_id, fields)

    def _dispatch(self, entry_id: str, fields: dict[str, str]) -> None:
        message: tuple[StreamId, str] | None = None
        for subscriber in list(self.subscribers):
            if not wanted(fields, subscriber.types, subscriber.series_id):
                continue
            if message is None:  # formatted once, for every client that wants it
                message = (parse_stream_id(entry_id, "entry id"), format_sse(entry_id, fields))
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
