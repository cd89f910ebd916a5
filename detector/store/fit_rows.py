"""The PostgreSQL side of fits: allocating their version numbers, then their rows in one commit.

One fit and a bulk fit's batch of a thousand take the same statements: a batch is only more
rows in each (``write_fits``), so the two cannot disagree on what a stored version is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
import psycopg

from detector.kinds.static import StaticModel
from detector.kinds.training import TrainingData
from detector.store.codec import copy_points

# Committed on its own, before the fits' transaction: a fit that later rolls back leaves a
# gap in the numbering, never a number the next fit could take again. A series allocating
# for the first time starts after its newest committed version (databases from before the
# counter existed), and the counter never falls behind what is committed. Rows are taken in
# series order, so two batches sharing series lock them in the same order (no deadlock).
_ALLOCATE = """
INSERT INTO version_allocations AS a (series_id, last_allocated)
SELECT k.series_id, coalesce(s.last_version, 0) + 1
FROM unnest(%(series)s::text[]) AS k(series_id)
LEFT JOIN series s ON s.series_id = k.series_id
ORDER BY k.series_id
ON CONFLICT (series_id) DO UPDATE
    SET last_allocated = greatest(a.last_allocated, excluded.last_allocated - 1) + 1
RETURNING series_id, last_allocated
"""

# The series rows (a data-modifying WITH runs whether or not it is read), then the version
# rows' ids and created_at (``now()``: the transaction's time), in one round trip.
_SERIES_AND_IDS = """
WITH created AS (
    INSERT INTO series (series_id, last_version)
    SELECT * FROM unnest(%s::text[], %s::int[])
    ON CONFLICT (series_id) DO NOTHING
)
SELECT now(), nextval(pg_get_serial_sequence('model_versions', 'id'))
FROM generate_series(1, %s)
"""

_VERSION_ROW_COLUMNS = (
    "id, series_id, version, kind, mean, std, sigma, direction, points_used, first_ts,"
    " last_ts, min_value, max_value, params, fit_job"
)


@dataclass(frozen=True, slots=True)
class NewFit:
    """A fitted version not stored yet: its series, validated points, rule and the kind's
    parameters (``model_versions.params``)."""

    series_id: str
    data: TrainingData
    model: StaticModel
    params: dict[str, Any]


async def allocate_versions(
    conn: psycopg.AsyncConnection[Any], series_ids: Sequence[str]
) -> list[int]:
    """A fresh version number for each series (distinct ids), in their order, committed at
    once in one statement (``conn`` is autocommit)."""
    cur = await conn.execute(_ALLOCATE, {"series": list(series_ids)})
    allocated = {str(series_id): int(version) for series_id, version in await cur.fetchall()}
    return [allocated[series_id] for series_id in series_ids]


async def write_fits(
    conn: psycopg.AsyncConnection[Any],
    fits: Sequence[NewFit],
    versions: Sequence[int],
    *,
    job: int | None = None,
) -> datetime:
    """Insert the versions, their points, and their MLflow record (an outbox row each, or for
    a bulk job's versions the job's progress), and advance each ``series.last_version`` (the
    newest committed version), all inside the caller's transaction; returns created_at (the
    transaction's time, the same for every row).

    The series rows are created first (the version rows reference them) without locking
    existing ones; their ``last_version`` is raised last, after locking them in id order, so
    concurrent fits of one series hold its row lock only for the moment before their commit,
    and batches sharing series cannot deadlock.
    """
    series_ids = [fit.series_id for fit in fits]
    order = sorted(range(len(fits)), key=series_ids.__getitem__)
    sorted_ids = [series_ids[i] for i in order]
    sorted_versions = [versions[i] for i in order]
    cur = await conn.execute(_SERIES_AND_IDS, (sorted_ids, sorted_versions, len(fits)))
    rows = await cur.fetchall()
    created_at: datetime = rows[0][0]
    model_ids = [int(row[1]) for row in rows]
    async with conn.cursor().copy(
        f"COPY model_versions ({_VERSION_ROW_COLUMNS}) FROM STDIN"
    ) as copy:
        for model_id, fit, version in zip(model_ids, fits, versions, strict=True):
            model, data = fit.model, fit.data
            await copy.write_row(
                (
                    model_id,
                    fit.series_id,
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
                    orjson.dumps(fit.params).decode(),
                    job,
                )
            )
    await copy_points(
        conn, [(model_id, fit.data) for model_id, fit in zip(model_ids, fits, strict=True)]
    )
    if job is None:
        await conn.execute(
            "INSERT INTO mlflow_outbox (model_id, series_id, version)"
            " SELECT * FROM unnest(%s::bigint[], %s::text[], %s::int[])",
            (model_ids, series_ids, list(versions)),
        )
    else:
        await conn.execute(
            "UPDATE fit_jobs SET fitted = fitted + %s, points = points + %s, updated_at = now()"
            " WHERE id = %s",
            (len(fits), sum(len(fit.data) for fit in fits), job),
        )
    if len(fits) > 1:
        await conn.execute(
            "SELECT 1 FROM series WHERE series_id = ANY(%s::text[]) ORDER BY series_id FOR UPDATE",
            (sorted_ids,),
        )
    await conn.execute(
        "UPDATE series s SET last_version = greatest(s.last_version, k.version),"
        " updated_at = now() FROM unnest(%s::text[], %s::int[]) AS k(series_id, version)"
        " WHERE s.series_id = k.series_id",
        (sorted_ids, sorted_versions),
    )
    return created_at


async def version_exists(conn: psycopg.AsyncConnection[Any], series_id: str, version: int) -> bool:
    """Whether PostgreSQL has the version committed (after a commit whose answer was lost)."""
    cur = await conn.execute(
        "SELECT 1 FROM model_versions WHERE series_id = %s AND version = %s", (series_id, version)
    )
    return await cur.fetchone() is not None
