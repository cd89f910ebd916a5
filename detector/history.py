"""Anomaly history in PostgreSQL: batched inserts by the worker, queries for the API."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from detector.identifiers import format_version, parse_version

_INSERT = """
INSERT INTO anomalies (series_id, ts, value, model_version, mean, std, lower_bound,
    upper_bound, score, source, source_stream, source_id, detected_at)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, 'stream', %s, %s, %s)
ON CONFLICT (source_stream, source_id) DO NOTHING
"""


async def record_anomalies(
    pool: AsyncConnectionPool, stream: str, events: Sequence[Mapping[str, str]]
) -> None:
    """Insert anomaly events (the `anomalies` stream's fields) in one round of statements.

    Idempotent: a redelivered reading has the same (stream, source_id) and is skipped, so the
    worker writes here before acknowledging and may safely write again after a crash.
    """
    if not events:
        return
    rows = [
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
            stream,
            e["source_id"],
            datetime.fromtimestamp(float(e["detected_at"]), tz=UTC),
        )
        for e in events
    ]
    async with pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
        await cur.executemany(_INSERT, rows)


async def query_anomalies(
    pool: AsyncConnectionPool,
    series_id: str,
    *,
    since: int | None = None,
    until: int | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    """A series' recorded anomalies with since <= timestamp <= until, oldest first."""
    async with pool.connection() as conn:
        cur = conn.cursor(row_factory=dict_row)
        await cur.execute(
            """
            SELECT series_id, ts, value, model_version, mean, std, lower_bound, upper_bound,
                   score, source, source_id, detected_at
            FROM anomalies
            WHERE series_id = %s AND ts >= %s AND ts <= %s
            ORDER BY ts, id
            LIMIT %s
            """,
            (series_id, 0 if since is None else since, 2**62 if until is None else until, limit),
        )
        rows = await cur.fetchall()
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
        }
        for r in rows
    ]
