"""Anomaly events: live as Server-Sent Events from the stream, and history from PostgreSQL."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
import orjson
from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse
from redis.asyncio import Redis

from api.deps import SeriesIdQueryDep, ServicesDep
from detector.connections import redis_client
from detector.errors import InvalidInputError, StoreUnavailableError
from detector.history import query_anomalies, query_episodes
from detector.identifiers import SERIES_ID_RULE, SERIES_ID_SCHEMA, validate_series_id
from detector.store import POSTGRES_ERRORS, REDIS_ERRORS
from detector.streams import decode_event

router = APIRouter(tags=["streams"])

_ENTRY_ID = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")
# Below the client's 10 s socket timeout; also the keep-alive period of an idle connection.
_BLOCK_MS = 5000


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
    last_event_id: Annotated[
        str | None, Header(description="Resume after this event id (browsers send it).")
    ] = None,
) -> StreamingResponse:
    """One `event: anomaly` per anomalous reading from now on (or after ``Last-Event-ID``),
    with the stream event's fields as JSON data; a comment line every 5 s keeps it open."""
    if series_id is not None:
        validate_series_id(series_id)
    if last_event_id is not None and _ENTRY_ID.fullmatch(last_event_id) is None:
        raise InvalidInputError("Last-Event-ID must be a stream entry id like 1700000000000-0")
    stream = services.settings.stream_anomalies
    # Its own connection: the blocking read holds it for the whole life of the response.
    client = redis_client(services.settings)
    try:
        # "$" resolved now, before the headers go out: an event published once the client
        # has its response is never missed.
        position = last_event_id or await _newest_id(client, stream)
    except REDIS_ERRORS as exc:
        await client.aclose()
        raise StoreUnavailableError("redis", f"Redis is unavailable: {exc}") from exc
    return StreamingResponse(
        _sse(request, client, stream, position, series_id),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _newest_id(client: Redis, stream: str) -> str:
    newest: Any = await client.xrevrange(stream, count=1)
    return str(newest[0][0]) if newest else "0-0"


async def _sse(
    request: Request, client: Redis, stream: str, position: str, series_id: str | None
) -> AsyncIterator[str]:
    try:
        yield "retry: 2000\n: connected\n\n"
        while not await request.is_disconnected():
            try:
                reply: Any = await client.xread({stream: position}, count=100, block=_BLOCK_MS)
            except REDIS_ERRORS:
                yield 'event: error\ndata: {"detail": "Redis is unavailable"}\n\n'
                return
            entries = reply[0][1] if reply else []
            if not entries:
                yield ": keep-alive\n\n"
            for entry_id, fields in entries:
                position = entry_id
                if series_id is None or fields.get("series_id") == series_id:
                    data = orjson.dumps(decode_event(fields)).decode()
                    yield f"id: {entry_id}\nevent: anomaly\ndata: {data}\n\n"
    finally:
        with anyio.CancelScope(shield=True):  # closes even when the disconnect cancelled us
            await client.aclose()


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
) -> dict[str, Any]:
    """Anomalies the stream workers recorded, oldest first, ``since <= timestamp <= until``;
    with ``episodes=true`` their episodes instead (``{"series_id", "episodes": [...]}``)."""
    try:
        if episodes:
            found = await query_episodes(
                services.store.pool, series_id, since=since, until=until, limit=limit
            )
            return {"series_id": series_id, "episodes": found}
        items = await query_anomalies(
            services.store.pool, series_id, since=since, until=until, limit=limit
        )
    except POSTGRES_ERRORS as exc:
        raise StoreUnavailableError("postgres", f"PostgreSQL is unavailable: {exc}") from exc
    return {"series_id": series_id, "anomalies": items}
