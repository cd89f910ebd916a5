"""Retention: old anomalies, old versions' training points and a stuck MLflow outbox.

One pass at a time across every process (a PostgreSQL advisory lock), each delete a bounded
batch (or one day's partition of the anomaly history) in its own short transaction, so the
job never holds a lock for long and can stop at any point: whatever is left is found again by
the next pass.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from detector.errors import POSTGRES_ERRORS
from detector.settings import Settings
from detector.store.partitions import AHEAD_DAYS, DAY_SECONDS, day_of, drop_days_before, ensure_days

log = logging.getLogger(__name__)

# Any constant; the same in every process. Distinct from the schema lock.
_RETENTION_LOCK = 0x72657465
_BATCH_ROWS = 10_000
_VERSIONS_A_ROUND = 100

# The default partition's old rows (readings of days without a partition), by its ts index.
_DELETE_OLD_DEFAULT = """
DELETE FROM anomalies_default WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM anomalies_default WHERE ts < %(cutoff)s LIMIT %(batch)s))
"""

# Versions of a series older than its newest ``keep`` whose points are still stored.
_VERSIONS_TO_TRIM = """
SELECT id FROM (
    SELECT id, points_deleted_at,
           row_number() OVER (PARTITION BY series_id ORDER BY version DESC) AS newer
    FROM model_versions
) v
WHERE newer > %(keep)s AND points_deleted_at IS NULL
ORDER BY id
LIMIT %(limit)s
"""

_DELETE_POINTS = """
DELETE FROM training_points WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM training_points WHERE model_id = %(model_id)s LIMIT %(batch)s))
"""

# Outbox rows being logged right now are locked by the tracker: skipped, never waited for.
_DELETE_OLD_OUTBOX = """
DELETE FROM mlflow_outbox WHERE model_id = ANY(ARRAY(
    SELECT model_id FROM mlflow_outbox
    WHERE created_at < now() - make_interval(days => %(days)s)
    ORDER BY model_id LIMIT %(batch)s FOR UPDATE SKIP LOCKED))
"""

_DELETE_OUTBOX_OVERFLOW = """
DELETE FROM mlflow_outbox WHERE model_id = ANY(ARRAY(
    SELECT model_id FROM mlflow_outbox ORDER BY model_id
    LIMIT %(batch)s FOR UPDATE SKIP LOCKED))
"""


@dataclass
class RetentionPass:
    """What one pass deleted (``anomalies``: rows of the default partition; whole days of
    the history are ``anomaly_days``, dropped partitions, whose rows are not counted)."""

    anomalies: int = 0
    anomaly_days: int = 0
    training_points: int = 0
    versions_trimmed: int = 0
    outbox_expired: int = 0
    outbox_overflow: int = 0


async def run_retention(pool: AsyncConnectionPool, settings: Settings) -> RetentionPass | None:
    """One retention pass; None when another process is running one."""
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT pg_try_advisory_lock(%s)", (_RETENTION_LOCK,))
        row = await cur.fetchone()
        if not (row and row[0]):
            return None
        try:
            done = RetentionPass()
            await _expire_anomalies(conn, settings.retention_anomalies_days, done)
            if settings.retention_training_versions > 0:
                await _trim_training_points(conn, settings.retention_training_versions, done)
            await _bound_outbox(conn, settings, done)
        finally:
            await conn.execute("SELECT pg_advisory_unlock(%s)", (_RETENTION_LOCK,))
    if any(vars(done).values()):
        log.info("retention pass: %s", done)
    return done


async def _expire_anomalies(
    conn: psycopg.AsyncConnection[Any], days: int, done: RetentionPass
) -> None:
    """Make the partitions of today and the next days ahead of time (so the writers rarely
    make one), then drop the days older than ``days`` (0: keep all) and delete the default
    partition's rows that old. Age is the reading's time (ts), as the partitions go by, on
    the database's clock."""
    cur = await conn.execute("SELECT floor(extract(epoch FROM now()))::bigint")
    row = await cur.fetchone()
    now = int(row[0]) if row else 0
    await ensure_days(conn, range(day_of(now), day_of(now) + AHEAD_DAYS + 1))
    if days <= 0:
        return
    cutoff = now - days * DAY_SECONDS
    done.anomaly_days = await drop_days_before(conn, cutoff)
    done.anomalies = await _drain(
        conn, _DELETE_OLD_DEFAULT, {"cutoff": cutoff, "batch": _BATCH_ROWS}
    )


async def _drain(conn: psycopg.AsyncConnection[Any], sql: str, params: dict[str, Any]) -> int:
    """Repeat a bounded delete (autocommit: one short transaction each) until it runs dry."""
    total = 0
    while True:
        cur = await conn.execute(sql, params)
        total += cur.rowcount
        if cur.rowcount < params["batch"]:
            return total


async def _trim_training_points(
    conn: psycopg.AsyncConnection[Any], keep: int, done: RetentionPass
) -> None:
    """Drop the points of every version but each series' newest ``keep``; the version rows
    stay (GET /models lists them, MLflow runs refer to them) and are marked, so /plot can say
    the points are gone. A version is marked after its last batch: an interrupted pass
    leaves it unmarked and the next pass finishes it."""
    while True:
        cur = await conn.execute(_VERSIONS_TO_TRIM, {"keep": keep, "limit": _VERSIONS_A_ROUND})
        model_ids = [int(r[0]) for r in await cur.fetchall()]
        for model_id in model_ids:
            cur = await conn.execute(
                "DELETE FROM training_arrays WHERE model_id = %s RETURNING cardinality(ts)",
                (model_id,),
            )
            done.training_points += sum(int(r[0]) for r in await cur.fetchall())
            done.training_points += await _drain(  # a version stored a row a point
                conn, _DELETE_POINTS, {"model_id": model_id, "batch": _BATCH_ROWS}
            )
            await conn.execute(
                "UPDATE model_versions SET points_deleted_at = now() WHERE id = %s", (model_id,)
            )
            done.versions_trimmed += 1
        if len(model_ids) < _VERSIONS_A_ROUND:
            return


async def _bound_outbox(
    conn: psycopg.AsyncConnection[Any], settings: Settings, done: RetentionPass
) -> None:
    """Give up on fits MLflow has not taken for too long, or beyond the cap: their runs are
    never logged (the versions stay stored), so each drop is a warning."""
    if settings.retention_outbox_days > 0:
        done.outbox_expired = await _drain(
            conn,
            _DELETE_OLD_OUTBOX,
            {"days": settings.retention_outbox_days, "batch": _BATCH_ROWS},
        )
        if done.outbox_expired:
            log.warning(
                "MLflow outbox: dropped %d fits waiting more than %d days; their runs will not"
                " be logged",
                done.outbox_expired,
                settings.retention_outbox_days,
            )
    if settings.retention_outbox_max_rows > 0:
        cur = await conn.execute("SELECT count(*) FROM mlflow_outbox")
        row = await cur.fetchone()
        excess = (int(row[0]) if row else 0) - settings.retention_outbox_max_rows
        while excess > 0:
            batch = min(excess, _BATCH_ROWS)
            cur = await conn.execute(_DELETE_OUTBOX_OVERFLOW, {"batch": batch})
            if cur.rowcount == 0:
                break
            done.outbox_overflow += cur.rowcount
            excess -= cur.rowcount
        if done.outbox_overflow:
            log.warning(
                "MLflow outbox over %d rows: dropped the %d oldest; their runs will not be logged",
                settings.retention_outbox_max_rows,
                done.outbox_overflow,
            )


async def retention_loop(pool: AsyncConnectionPool, settings: Settings) -> None:
    """Run a pass every ``retention_interval_seconds`` (the first one interval after start,
    so short-lived processes and test runs never delete anything behind a user's back)."""
    interval = settings.retention_interval_seconds
    while True:
        await asyncio.sleep(interval)
        try:
            await run_retention(pool, settings)
        except (*POSTGRES_ERRORS, psycopg.Error) as exc:
            log.warning("retention pass failed (next in %.0f s): %s", interval, exc)


def start_retention(pool: AsyncConnectionPool, settings: Settings) -> asyncio.Task[None] | None:
    """The background job, or None when it is disabled (interval 0)."""
    if settings.retention_interval_seconds <= 0:
        return None
    return asyncio.create_task(retention_loop(pool, settings), name="retention")
