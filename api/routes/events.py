"""Anomaly events: live as Server-Sent Events from the stream, and history from PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse

from api.deps import SeriesIdQueryDep, ServicesDep
from api.event_feed import EventFeed, Subscriber, parse_stream_id
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
        str | None, Query(description="Resume after this event id (for clients without headers).")
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
    A comment line every 5 s keeps it open. A client that reads too slowly gets an
    `event: error` and is closed."""
    if series_id is not None:
        validate_series_id(series_id)
    wanted_types = frozenset(types.split(","))
    if not wanted_types <= set(EVENT_TYPES):
        raise InvalidInputError(f"types must be a comma-separated list of {', '.join(EVENT_TYPES)}")
    # A reconnecting browser sends the newest id it saw; the URL still carries the first one.
    resume = None
    if last_event_id is not None:
        parse_stream_id(last_event_id, "Last-Event-ID")
        resume = last_event_id
    elif last_id is not None:
        parse_stream_id(last_id, "last_id")
        resume = last_id
    feed = services.events
    try:
        subscriber, joined = await feed.join(series_id, wanted_types)
    except REDIS_ERRORS as exc:
        raise StoreUnavailableError("redis", f"Redis is unavailable: {exc}") from exc
    try:
        # "Now" resolved before the headers go out: an event published once the client has
        # its response is never missed.
        start = resume or await feed.newest_id()
    except REDIS_ERRORS as exc:
        feed.leave(subscriber)
        raise StoreUnavailableError("redis", f"Redis is unavailable: {exc}") from exc
    return StreamingResponse(
        _sse(request, feed, subscriber, start, joined),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _sse(
    request: Request, feed: EventFeed, subscriber: Subscriber, start: str, joined: str
) -> AsyncIterator[str]:
    """Entries after ``start``: those up to ``joined`` read once from the stream, the rest
    from the shared feed; ids at or below the last one sent are skipped, so the switch
    neither loses nor repeats an entry."""
    sent = parse_stream_id(start, "start")
    try:
        yield "retry: 2000\n: connected\n\n"
        if sent < parse_stream_id(joined, "joined"):
            try:
                async for entry, message in feed.catch_up(
                    start, joined, subscriber.series_id, subscriber.types
                ):
                    sent = entry
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
            entry, message = item
            if entry > sent:
                sent = entry
                yield message
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
