"""The PostgreSQL side of a fit: allocating its version number, then its rows in one commit."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson
import psycopg

from detector.kinds.static import StaticModel
from detector.kinds.training import TrainingData
from detector.store.codec import copy_points

# Committed on its own, before the fit's transaction: a fit that later rolls back leaves a
# gap in the numbering, never a number the next fit could take again. A series allocating
# for the first time starts after its newest committed version (databases from before the
# counter existed), and the counter never falls behind what is committed.
_ALLOCATE = """
INSERT INTO version_allocations AS a (series_id, last_allocated)
VALUES (%(series_id)s,
        coalesce((SELECT last_version FROM series WHERE series_id = %(series_id)s), 0) + 1)
ON CONFLICT (series_id) DO UPDATE
    SET last_allocated = greatest(a.last_allocated, excluded.last_allocated - 1) + 1
RETURNING last_allocated
"""

_INSERT_VERSION = """
INSERT INTO model_versions (series_id, version, kind, mean, std, sigma, direction,
    points_used, first_ts, last_ts, min_value, max_value, params)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s::jsonb)
RETURNING id, created_at
"""


async def allocate_version(conn: psycopg.AsyncConnection[Any], series_id: str) -> int:
    """A fresh version number for the series, committed at once (``conn`` is autocommit)."""
    cur = await conn.execute(_ALLOCATE, {"series_id": series_id})
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def write_fit(
    conn: psycopg.AsyncConnection[Any],
    series_id: str,
    version: int,
    data: TrainingData,
    model: StaticModel,
    params: dict[str, Any],
) -> datetime:
    """Insert the version, its points and its outbox row, and advance ``series.last_version``
    (the newest committed version), all inside the caller's transaction; returns created_at.

    The series row is created first (the version row references it) without locking an
    existing one; its ``last_version`` is raised last, so concurrent fits of one series hold
    its row lock only for the moment before their commit.
    """
    await conn.execute(
        "INSERT INTO series (series_id, last_version) VALUES (%s, %s)"
        " ON CONFLICT (series_id) DO NOTHING",
        (series_id, version),
    )
    cur = await conn.execute(
        _INSERT_VERSION,
        (
            series_id,
            version,
            model.kind,
            model.mean,
            model.std,
            model.sigma,
            model.direction,
            len(data),
            int(data.timestamps[0]),
            int(data.timestamps[-1]),
            float(data.values.min()),
            float(data.values.max()),
            orjson.dumps(params).decode(),
        ),
    )
    row = await cur.fetchone()
    assert row is not None
    model_id, created_at = int(row[0]), row[1]
    await copy_points(conn, model_id, data)
    await conn.execute(
        "INSERT INTO mlflow_outbox (model_id, series_id, version) VALUES (%s, %s, %s)",
        (model_id, series_id, version),
    )
    await conn.execute(
        "UPDATE series SET last_version = greatest(last_version, %s), updated_at = now()"
        " WHERE series_id = %s",
        (version, series_id),
    )
    return created_at  # type: ignore[no-any-return]


async def version_exists(conn: psycopg.AsyncConnection[Any], series_id: str, version: int) -> bool:
    """Whether PostgreSQL has the version committed (after a commit whose answer was lost)."""
    cur = await conn.execute(
        "SELECT 1 FROM model_versions WHERE series_id = %s AND version = %s", (series_id, version)
    )
    return await cur.fetchone() is not None
