"""Incidents recorded by the stream workers (docs/stream-contract.md#incidents), paged."""

from __future__ import annotations

import re
from typing import Annotated, Literal
from urllib.parse import urlencode

from fastapi import APIRouter, Query, Request

from api.deps import ServicesDep
from api.schemas import Incident, IncidentPage
from detector.errors import InvalidInputError
from detector.kinds.training import MAX_TIMESTAMP
from detector.store.incidents import query_incidents

router = APIRouter(tags=["streams"])

# Stream and topic names as the settings take them (and their `kafka:` form); incident ids are
# `incident:` and a readings entry id (`ms-seq`, or Kafka's `topic/partition/offset`).
_NAME = r"[A-Za-z0-9_.:{}/-]"
_SOURCE_PATTERN = rf"^{_NAME}+$"
# A page key, `<first onset>,<source>,<incident id>`: every string of this form is one (an
# onset beyond the largest timestamp is a position after every incident), so any the schema
# allows is answered.
_CURSOR = re.compile(rf"([0-9]{{1,19}}),({_NAME}{{1,256}}),({_NAME}{{1,512}})")


def cursor_of(first_onset: int, source: str, incident_id: str) -> str:
    """The ``before`` of the page after an item."""
    return f"{first_onset},{source},{incident_id}"


def parse_cursor(text: str) -> tuple[int, str, str]:
    """A ``before`` value back to its page key; a 422 when it does not have the form."""
    match = _CURSOR.fullmatch(text)
    if match is None:
        raise InvalidInputError(
            "before must be a page key, <first onset>,<source>,<incident id>, as a previous "
            "page's next URL carries it"
        )
    return min(int(match[1]), MAX_TIMESTAMP + 1), match[2], match[3]


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
        Query(
            pattern=_CURSOR.pattern.join("^$"),
            description="The page key in a previous page's `next` URL",
        ),
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
