"""Anomaly events: live as Server-Sent Events from the stream, and history from PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse

from api.deps import SeriesIdQueryDep, ServicesDep
from api.event_feed import (
    EventFeed,
    StreamId,
    Subscriber,
    format_id,
    parse_cursor,
    parse_stream_id,
)
from detector.errors import REDIS_ERRORS, InvalidInputError, StoreUnavailableError
from detector.identifiers import SERIES_ID_RULE, SERIES_ID_SCHEMA, validate_series_id
from detector.store.history import query_anomalies, query_episodes
from detector.wire.events import ANOMALY, EVENT_TYPES

router = APIRouter(tags=["streams"])

# The keep-alive period of an idle connection.
_KEEP_ALIVE_SECONDS = 5.0
_REDIS_DOWN = 'event: error\ndata: {"detail": "Redis is unavailable"}\n\n'
_TOO_SLOW = (
    'event: error\ndata: {"detail": "the client read too slowly and missed events; '
    'reconnect with Last-Event-ID"}\n\n'
)


@router.get(
    "/events",
    summary="Anomaly events as Server-Sent Events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def events(
    request: Request,
    services: ServicesDep,
    series_id: Annotated[
        str | None, Query(description=SERIES_ID_RULE, json_schema_extra=SERIES_ID_SCHEMA)
    ] = None,
    last_id: Annotated[
        str | None,
        Query(
            description="Resume after this event id (for clients without headers): a "
            "message's `id`; with sharded streams the comma-joined positions it carries."
        ),
    ] = None,
    last_event_id: Annotated[
        str | None, Header(description="Resume after this event id (browsers send it).")
    ] = None,
    types: Annotated[
        str,
        Query(
            description="Comma-separated event types to send: `anomaly` (the default), "
            "`no_data` (a fitted series went silent, or resumed) and `incident` (episodes of "
            "many series opened together; not sent to clients of one series).",
            pattern=r"^(anomaly|no_data|incident)(,(anomaly|no_data|incident))*$",
        ),
    ] = ANOMALY,
) -> StreamingResponse:
    """One `event: anomaly` per anomalous reading from now on (or after ``Last-Event-ID``,
    else ``last_id``), with the stream event's fields as JSON data; with
    ``types=anomaly,no_data,incident`` also `event: no_data` and `event: incident` messages.
    With STREAM_SHARDS above 1 it is one feed over every shard, and a message's id is the
    shards' positions after it, comma-joined (one id resumes every shard after it).
    A comment line every 5 s keeps it open. A client that reads too slowly gets an
    `event: error` and is closed."""
    if series_id is not None:
        validate_series_id(series_id)
    wanted_types = frozenset(types.split(","))
    if not wanted_types <= set(EVENT_TYPES):
        raise InvalidInputError(f"types must be a comma-separated list of {', '.join(EVENT_TYPES)}")
    feed = services.events
    # A reconnecting browser sends the newest id it saw; the URL still carries the first one.
    # An empty id is no id (the SSE spec resets the last event id to "" with an empty `id:`).
    resume = None
    if last_event_id:
        resume = parse_cursor(last_event_id, "Last-Event-ID", feed.shards)
    elif last_id:
        resume = parse_cursor(last_id, "last_id", feed.shards)
    try:
        subscriber, joined = await feed.join(series_id, wanted_types)
    except REDIS_ERRORS as exc:
        raise StoreUnavailableError("redis", f"Redis is unavailable: {exc}") from exc
    try:
        # "Now" resolved before the headers go out: an event published once the client has
        # its response is never missed.
        start = resume or await feed.newest()
    except REDIS_ERRORS as exc:
        feed.leave(subscriber)
        raise StoreUnavailableError("redis", f"Redis is unavailable: {exc}") from exc
    return StreamingResponse(
        _sse(request, feed, subscriber, start, joined),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _sse(
    request: Request,
    feed: EventFeed,
    subscriber: Subscriber,
    start: list[str],
    joined: list[str],
) -> AsyncIterator[str]:
    """Entries after ``start`` (a position a shard): those up to ``joined`` read once from the
    streams, the rest from the shared feed; a shard's entries at or below the position caught
    up to are skipped, so the switch neither loses nor repeats an entry. Each message's id is
    the positions after it (with one shard, its entry id)."""
    after = [parse_stream_id(p, "start") for p in start]
    until = [parse_stream_id(p, "joined") for p in joined]
    # What the client has, once caught up: every shard's entries up to here.
    floor = [max(a, u) for a, u in zip(after, until, strict=True)]
    # Until the feed's positions pass the client's own in every shard (the client resumed
    # from a position this feed had not reached yet), ids are the larger of the two.
    ahead: list[StreamId] | None = floor
    try:
        yield "retry: 2000\n: connected\n\n"
        if any(a < u for a, u in zip(after, until, strict=True)):
            try:
                async for message in feed.catch_up(
                    start, joined, subscriber.series_id, subscriber.types
                ):
                    yield message
            except REDIS_ERRORS:
                yield _REDIS_DOWN
                return
        while not await request.is_disconnected():
            if subscriber.dropped and subscriber.queue.empty():
                yield _TOO_SLOW
                return
            try:
                item = await asyncio.wait_for(subscriber.queue.get(), _KEEP_ALIVE_SECONDS)
            except TimeoutError:
                yield ": keep-alive\n\n"
                continue
            if item is None:
                yield _REDIS_DOWN
                return
            if item.entry <= floor[item.shard]:
                continue
            if ahead is not None and any(c < a for c, a in zip(item.cursor, ahead, strict=True)):
                cursor = ",".join(
                    format_id(max(c, a)) for c, a in zip(item.cursor, ahead, strict=True)
                )
                yield f"id: {cursor}\n{item.body}"
                continue
            ahead = None
            yield item.text
    finally:
        feed.leave(subscriber)


@router.get("/anomalies", summary="Recorded anomalies of a series")
async def anomalies(
    services: ServicesDep,
    series_id: SeriesIdQueryDep,
    since: Annotated[int | None, Query(ge=0, description="Earliest reading timestamp")] = None,
    until: Annotated[int | None, Query(ge=0, description="Latest reading timestamp")] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
    episodes: Annotated[
        bool,
        Query(description="Group into episodes (id, first/last timestamp, count, max |score|)"),
    ] = False,
    source: Annotated[
        Literal["stream", "backfill"],
        Query(description="The live stream's anomalies (default), or backfill jobs'"),
    ] = "stream",
) -> dict[str, Any]:
    """Anomalies the stream workers recorded, oldest first, ``since <= timestamp <= until``;
    with ``episodes=true`` their episodes instead (``{"series_id", "episodes": [...]}``);
    ``source=backfill``: those a backfill recorded instead (never mixed with live ones)."""
    pool = services.store.pool
    if episodes:
        found = await query_episodes(
            pool, series_id, since=since, until=until, limit=limit, source=source
        )
        return {"series_id": series_id, "episodes": found}
    items = await query_anomalies(
        pool, series_id, since=since, until=until, limit=limit, source=source
    )
    return {"series_id": series_id, "anomalies": items}
