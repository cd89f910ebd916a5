"""Anomaly history in PostgreSQL: batched inserts by the worker, queries for the API."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from detector.errors import POSTGRES_ERRORS, StoreUnavailableError
from detector.identifiers import format_version, parse_version
from detector.kinds.training import MAX_TIMESTAMP
from detector.store.partitions import day_of, ensure_days, writer_days

# One statement for the whole batch (arrays unnested server-side): one round trip, atomic
# without a transaction block, however many anomalies the batch holds.
_INSERT = """
INSERT INTO anomalies (series_id, ts, value, model_version, mean, std, lower_bound,
    upper_bound, score, source, source_stream, source_id, detected_at, episode_id, onset, test,
    base_score)
SELECT s, t, v, mv, m, sd, lo, up, sc, %s, %s, sid, da, eid, ons, tst, bs
FROM unnest(%s::text[], %s::bigint[], %s::float8[], %s::int[], %s::float8[], %s::float8[],
    %s::float8[], %s::float8[], %s::float8[], %s::text[], %s::timestamptz[], %s::text[],
    %s::boolean[], %s::text[], %s::float8[])
    AS u(s, t, v, mv, m, sd, lo, up, sc, sid, da, eid, ons, tst, bs)
ON CONFLICT (source_stream, source_id, ts) DO NOTHING
"""


async def record_anomalies(
    pool: AsyncConnectionPool,
    stream: str,
    events: Sequence[Mapping[str, str]],
    *,
    source: str = "stream",
    retention_days: int,
) -> None:
    """Insert anomaly events (the `anomalies` stream's fields) in one statement; ``source``
    is what the rows' ``source`` column says (``stream``, or ``backfill`` for a backfill).
    The days the batch touches within the writers' window (``retention_days``: what retention
    keeps) get their partition first, unless known to have one.

    Idempotent: a redelivered reading has the same (stream, source_id, timestamp) and is
    skipped, so the worker writes here before acknowledging and may safely write again after
    a crash.
    """
    if not events:
        return
    columns: tuple[list[Any], ...] = tuple([] for _ in range(15))
    for e in events:
        for column, value in zip(
            columns,
            (
                e["series_id"],
                int(e["timestamp"]),
                float(e["value"]),
                parse_version(e["model_version"])[0],
                float(e["mean"]),
                float(e["std"]),
                float(e["lower"]),
                float(e["upper"]),
                float(e["score"]),
                e["source_id"],
                datetime.fromtimestamp(float(e["detected_at"]), tz=UTC),
                e.get("episode_id"),
                None if "onset" not in e else e["onset"] == "1",
                e.get("test") or None,
                float(e["base_score"]) if e.get("base_score") else None,
            ),
            strict=True,
        ):
            column.append(value)
    async with pool.connection() as conn:
        await ensure_days(
            conn, {day_of(ts) for ts in columns[1]}, window=writer_days(retention_days)
        )
        await conn.execute(_INSERT, (source, stream, *columns))


async def query_anomalies(
    pool: AsyncConnectionPool,
    series_id: str,
    *,
    since: int | None = None,
    until: int | None = None,
    limit: int = 100,
    source: str = "stream",
) -> list[dict[str, Any]]:
    """A series' recorded anomalies with since <= timestamp <= until, oldest first, of one
    ``source`` (``stream``: the live workers'; ``backfill``: backfill jobs')."""
    rows = await _fetch(
        pool,
        """
        SELECT series_id, ts, value, model_version, mean, std, lower_bound, upper_bound,
               score, source, source_id, detected_at, episode_id, onset
        FROM anomalies
        WHERE series_id = %s AND ts >= %s AND ts <= %s AND source = %s
        ORDER BY ts, id
        LIMIT %s
        """,
        (series_id, *_time_range(since, until), source, limit),
    )
    return [
        {
            "series_id": r["series_id"],
            "timestamp": int(r["ts"]),
            "value": r["value"],
            "model_version": format_version(int(r["model_version"])),
            "mean": r["mean"],
            "std": r["std"],
            "lower": r["lower_bound"],
            "upper": r["upper_bound"],
            "score": r["score"],
            "source": r["source"],
            "source_id": r["source_id"],
            "detected_at": r["detected_at"].timestamp(),
            "episode_id": r["episode_id"],
            "onset": r["onset"],
        }
        for r in rows
    ]


async def query_episodes(
    pool: AsyncConnectionPool,
    series_id: str,
    *,
    since: int | None = None,
    until: int | None = None,
    limit: int = 100,
    source: str = "stream",
) -> list[dict[str, Any]]:
    """A series' recorded episodes with an anomaly in since <= timestamp <= until, oldest
    first: id, first and last anomaly timestamp, count and max |score| of their anomalies in
    that range (anomalies recorded without an episode are left out)."""
    rows = await _fetch(
        pool,
        """
        SELECT episode_id, min(ts) AS first_ts, max(ts) AS last_ts, count(*) AS n,
               max(abs(score)) AS max_abs_score,
               min(ts) FILTER (WHERE onset) AS onset_ts
        FROM anomalies
        WHERE series_id = %s AND ts >= %s AND ts <= %s AND episode_id IS NOT NULL
          AND source = %s
        GROUP BY episode_id
        ORDER BY min(ts), episode_id
        LIMIT %s
        """,
        (series_id, *_time_range(since, until), source, limit),
    )
    return [
        {
            "episode_id": r["episode_id"],
            "first_timestamp": int(r["first_ts"]),
            "last_timestamp": int(r["last_ts"]),
            "onset_timestamp": None if r["onset_ts"] is None else int(r["onset_ts"]),
            "count": int(r["n"]),
            "max_abs_score": float(r["max_abs_score"]),
        }
        for r in rows
    ]


async def _fetch(
    pool: AsyncConnectionPool, sql: str, params: tuple[Any, ...]
) -> list[dict[str, Any]]:
    """Rows of a history query; PostgreSQL unreachable is StoreUnavailableError (a 503)."""
    try:
        async with pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(sql, params)
            return await cur.fetchall()
    except POSTGRES_ERRORS as exc:
        raise StoreUnavailableError("postgres", f"PostgreSQL is unavailable: {exc}") from exc


def _time_range(since: int | None, until: int | None) -> tuple[int, int]:
    """Inclusive timestamp bounds of a history query; an open end is unbounded."""
    return (0 if since is None else since, MAX_TIMESTAMP if until is None else until)
