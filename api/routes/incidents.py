"""Incidents recorded by the stream workers (docs/stream-contract.md#incidents), paged."""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Literal
from urllib.parse import urlencode

import orjson
from fastapi import APIRouter, Query, Request

from api.deps import ServicesDep
from api.schemas import Incident, IncidentPage
from detector.errors import InvalidInputError
from detector.kinds.training import MAX_TIMESTAMP
from detector.store.incidents import query_incidents

router = APIRouter(tags=["streams"])

_CURSOR_MAX = 1024  # characters: a page key is a timestamp and two short names
# Stream and topic names as the settings take them (and their `kafka:` form).
_SOURCE_PATTERN = r"^[A-Za-z0-9_.:{}/-]+$"


def cursor_of(first_onset: int, source: str, incident_id: str) -> str:
    """The opaque ``before`` of the page after an item (URL-safe)."""
    raw = orjson.dumps([first_onset, source, incident_id])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def parse_cursor(text: str) -> tuple[int, str, str]:
    """A ``before`` value back to its page key; a 422 when it is not one ``next`` gave."""
    try:
        padded = text + "=" * (-len(text) % 4)
        key = orjson.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
        first, source, incident_id = key
        if (
            isinstance(first, int)
            and not isinstance(first, bool)
            and 0 <= first <= MAX_TIMESTAMP
            and isinstance(source, str)
            and isinstance(incident_id, str)
            and "\x00" not in source + incident_id  # PostgreSQL text never holds NUL
        ):
            return first, source, incident_id
    except (ValueError, TypeError, binascii.Error, UnicodeEncodeError, orjson.JSONDecodeError):
        pass
    raise InvalidInputError("before must be the value a previous page's next URL carries")


@router.get(
    "/incidents",
    response_model=IncidentPage,
    summary="Incidents: episodes of many series opened together (paged, newest first)",
)
async def incidents(
    request: Request,
    services: ServicesDep,
    since: Annotated[
        int | None,
        Query(ge=0, le=MAX_TIMESTAMP, description="Earliest first onset (reading timestamp)"),
    ] = None,
    until: Annotated[
        int | None,
        Query(ge=0, le=MAX_TIMESTAMP, description="Latest first onset (reading timestamp)"),
    ] = None,
    state: Annotated[Literal["open", "closed"] | None, Query()] = None,
    source: Annotated[
        str | None,
        Query(
            min_length=1,
            max_length=256,
            pattern=_SOURCE_PATTERN,
            description="Only this output's incidents (`anomalies`, `kafka:anomalies` …)",
        ),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    before: Annotated[
        str | None,
        Query(max_length=_CURSOR_MAX, description="From a previous page's `next` URL"),
    ] = None,
) -> IncidentPage:
    key = parse_cursor(before) if before is not None else None
    rows = await query_incidents(
        services.store.pool,
        since=since,
        until=until,
        state=state,
        source=source,
        before=key,
        limit=limit + 1,
    )
    page, more = rows[:limit], len(rows) > limit
    next_url = None
    if more:
        last = page[-1]
        query = {
            name: value
            for name, value in (
                ("since", since),
                ("until", until),
                ("state", state),
                ("source", source),
            )
            if value is not None
        }
        query |= {
            "limit": limit,
            "before": cursor_of(last["first_onset"], last["source"], last["incident_id"]),
        }
        next_url = str(request.url.replace(query=urlencode(query)))
    return IncidentPage(items=[Incident(**r) for r in page], next=next_url)
