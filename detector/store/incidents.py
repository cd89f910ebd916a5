"""Incidents in PostgreSQL: idempotent upserts by the workers, paged queries for the API."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from detector.errors import POSTGRES_ERRORS, StoreUnavailableError

# One statement per batch of states. A state only moves forward (counts and the last onset
# up, the first onset down, closed once and for good), so writing one again, or an older one
# after a newer (two workers, a redelivery, a lease taken over), changes nothing.
_UPSERT = """
INSERT INTO incidents (source, incident_id, state, opened_at, closed_at, series_count,
    onset_count, first_onset, last_onset, closed_by)
SELECT %s, i, st, oa, ca, sc, oc, fo, lo, cb
FROM unnest(%s::text[], %s::text[], %s::timestamptz[], %s::timestamptz[], %s::int[],
    %s::int[], %s::bigint[], %s::bigint[], %s::text[]) AS u(i, st, oa, ca, sc, oc, fo, lo, cb)
ON CONFLICT (source, incident_id) DO UPDATE SET
    state = CASE WHEN incidents.state = 'closed' THEN 'closed' ELSE EXCLUDED.state END,
    closed_at = COALESCE(incidents.closed_at, EXCLUDED.closed_at),
    closed_by = COALESCE(incidents.closed_by, EXCLUDED.closed_by),
    series_count = GREATEST(incidents.series_count, EXCLUDED.series_count),
    onset_count = GREATEST(incidents.onset_count, EXCLUDED.onset_count),
    first_onset = LEAST(incidents.first_onset, EXCLUDED.first_onset),
    last_onset = GREATEST(incidents.last_onset, EXCLUDED.last_onset)
"""

_COLUMNS = (
    "incident_id",
    "state",
    "opened_at",
    "closed_at",
    "series_count",
    "onset_count",
    "first_onset",
    "last_onset",
    "closed_by",
)


def _row(e: Mapping[str, str]) -> dict[str, Any]:
    closed = e.get("state") == "closed"
    return {
        "incident_id": e["incident_id"],
        "state": "closed" if closed else "open",
        "opened_at": datetime.fromtimestamp(float(e["opened_at"]), tz=UTC),
        "closed_at": datetime.fromtimestamp(float(e["closed_at"]), tz=UTC) if closed else None,
        "series_count": int(e["series_count"]),
        "onset_count": int(e["onset_count"]),
        "first_onset": int(e["first_onset"]),
        "last_onset": int(e["last_onset"]),
        "closed_by": e.get("closed_by") if closed else None,
    }


def merge_states(events: Iterable[Mapping[str, str]]) -> list[dict[str, Any]]:
    """One row per incident from its states (events): the furthest forward of each column,
    as the upsert would leave them (one INSERT may not touch a row twice)."""
    rows: dict[str, dict[str, Any]] = {}
    for e in events:
        new = _row(e)
        old = rows.get(new["incident_id"])
        if old is None:
            rows[new["incident_id"]] = new
            continue
        old["state"] = "closed" if "closed" in (old["state"], new["state"]) else "open"
        old["closed_at"] = old["closed_at"] or new["closed_at"]
        old["closed_by"] = old["closed_by"] or new["closed_by"]
        for name in ("series_count", "onset_count", "last_onset"):
            old[name] = max(old[name], new[name])
        old["first_onset"] = min(old["first_onset"], new["first_onset"])
    return list(rows.values())


async def record_incidents(
    pool: AsyncConnectionPool, source: str, events: Iterable[Mapping[str, str]]
) -> None:
    """Upsert incident states (the `incident` events' fields) of ``source`` in one statement."""
    rows = merge_states(events)
    if not rows:
        return
    columns = tuple([r[name] for r in rows] for name in _COLUMNS)
    async with pool.connection() as conn:
        await conn.execute(_UPSERT, (source, *columns))


async def query_incidents(
    pool: AsyncConnectionPool,
    *,
    since: int | None = None,
    until: int | None = None,
    state: str | None = None,
    source: str | None = None,
    before: tuple[int, str, str] | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    """Incidents whose first onset is in since <= t <= until, newest first (by first onset,
    then source and id), after the ``before`` key (first onset, source, id) of a previous
    page."""
    where = ["TRUE"]
    params: list[Any] = []
    if since is not None:
        where.append("first_onset >= %s")
        params.append(since)
    if until is not None:
        where.append("first_onset <= %s")
        params.append(until)
    if state is not None:
        where.append("state = %s")
        params.append(state)
    if source is not None:
        where.append("source = %s")
        params.append(source)
    if before is not None:
        where.append("(first_onset, source, incident_id) < (%s, %s, %s)")
        params += list(before)
    sql = f"""
        SELECT source, incident_id, state, opened_at, closed_at, series_count, onset_count,
               first_onset, last_onset, closed_by
        FROM incidents
        WHERE {" AND ".join(where)}
        ORDER BY first_onset DESC, source DESC, incident_id DESC
        LIMIT %s
    """  # noqa: S608 (only fixed fragments; values are bound parameters)
    params.append(limit)
    try:
        async with pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(sql, params)
            found = await cur.fetchall()
    except POSTGRES_ERRORS as exc:
        raise StoreUnavailableError("postgres", f"PostgreSQL is unavailable: {exc}") from exc
    return [
        {
            "incident_id": r["incident_id"],
            "source": r["source"],
            "state": r["state"],
            "opened_at": r["opened_at"].timestamp(),
            "closed_at": None if r["closed_at"] is None else r["closed_at"].timestamp(),
            "series_count": int(r["series_count"]),
            "onset_count": int(r["onset_count"]),
            "first_onset": int(r["first_onset"]),
            "last_onset": int(r["last_onset"]),
            "closed_by": r["closed_by"],
        }
        for r in found
    ]
