"""The anomaly history's day partitions: made on demand by the writers and ahead of time by
the retention pass, dropped by retention once their whole day is older than it keeps.

The table, its DEFAULT partition and the function that makes a day's partition
(``anomalies_day_partition``, which moves the rows of that day out of the default partition)
are in schema.sql. Here: which days get a partition, an in-process record of the days known
to have one (so a writer's common path issues no DDL and no extra query), and the drop.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any, Final

import psycopg
from psycopg import sql

log = logging.getLogger(__name__)

DAY_SECONDS: Final = 86_400
# Days after today that get their partition ahead of time (the retention pass) and on demand.
AHEAD_DAYS: Final = 2
# How far back a writer makes partitions when anomalies are kept forever (retention 0): older
# readings (a backfill of old history, fuzzed timestamps) go to the default partition, so
# garbage timestamps never make a partition each.
FOREVER_PAST_DAYS: Final = 365
# Making or dropping a partition waits this long at most for the table's locks (behind a long
# query, say): a waiting DDL statement would hold up every insert and query queued behind it.
# A writer that gives up inserts into the default partition and asks again with its next
# batch; a retention pass leaves the drop to the next pass.
_LOCK_TIMEOUT: Final = "2s"

_DAY_PARTITIONS = r"""
SELECT c.relname, to_date(right(c.relname, 8), 'YYYYMMDD') - date '1970-01-01'
FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
WHERE i.inhparent = 'anomalies'::regclass AND c.relname ~ '^anomalies_d[0-9]{8}$'
ORDER BY 2
"""

# The days known to have their partition, per database (host, port, name). Retention drops a
# partition only once its day has left the writers' window (the same RETENTION_ANOMALIES_DAYS
# everywhere), so a known day stays valid; a stale one would only send rows to the default
# partition.
_known: dict[tuple[str, int, str], set[int]] = {}


def day_of(ts: int) -> int:
    """The UTC day (days since 1970-01-01) of a Unix timestamp: its partition's number."""
    return ts // DAY_SECONDS


def writer_days(retention_days: int, now: float | None = None) -> range:
    """The days whose partition a writer makes on demand: from the oldest day retention keeps
    any of (``FOREVER_PAST_DAYS`` back when it keeps all) to ``AHEAD_DAYS`` after today.
    Readings of other days go to the default partition."""
    now = time.time() if now is None else now
    past = retention_days if retention_days > 0 else FOREVER_PAST_DAYS
    return range(day_of(int(now) - past * DAY_SECONDS), day_of(int(now)) + AHEAD_DAYS + 1)


async def ensure_days(
    conn: psycopg.AsyncConnection[Any], days: Iterable[int], *, window: range | None = None
) -> None:
    """Make the partitions of ``days`` (those within ``window`` when given) not known to
    exist. Each in its own short transaction (the connection is in autocommit); one that fails
    for any reason but a lost connection is logged and left: its rows go to the default
    partition, and the next call asks again, so a lost race never fails an insert."""
    info = conn.info
    known = _known.setdefault((info.host, info.port, info.dbname), set())
    wanted = sorted(d for d in set(days) - known if window is None or d in window)
    for day in wanted:
        try:
            async with conn.transaction():
                await conn.execute(f"SET LOCAL lock_timeout = '{_LOCK_TIMEOUT}'")
                cur = await conn.execute("SELECT anomalies_day_partition(%s)", (day,))
                row = await cur.fetchone()
        except psycopg.Error as exc:
            if conn.broken or conn.closed:
                raise
            log.warning(
                "anomalies: no partition for day %d yet (its rows go to the default"
                " partition; asked again with the next batch): %s",
                day,
                exc,
            )
            continue
        if row and row[0]:
            log.info("anomalies: partition of day %d made", day)
        known.add(day)
    if window is not None and len(known) > 4 * len(window):
        known.difference_update([d for d in known if d not in window])


async def drop_days_before(conn: psycopg.AsyncConnection[Any], cutoff: int) -> int:
    """Drop the day partitions whose whole day is older than Unix time ``cutoff``, oldest
    first, each in its own transaction (dropping a partition locks the whole table, briefly);
    one whose locks are not had in time is left to the next pass. How many were dropped."""
    cur = await conn.execute(_DAY_PARTITIONS)
    dropped = 0
    for name, day in await cur.fetchall():
        if (int(day) + 1) * DAY_SECONDS > cutoff:
            break
        try:
            async with conn.transaction():
                await conn.execute(f"SET LOCAL lock_timeout = '{_LOCK_TIMEOUT}'")
                await conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(name)))
        except psycopg.errors.LockNotAvailable as exc:
            log.warning("retention: %s not dropped (the next pass tries again): %s", name, exc)
            break
        dropped += 1
    return dropped
