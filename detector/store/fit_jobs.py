"""Bulk fit jobs in PostgreSQL (``fit_jobs``): created before a job's first batch, advanced by
each batch's own transaction (``detector.store.fit_rows.write_fits``), finished at its end."""

from __future__ import annotations

from typing import Any

import orjson
import psycopg


async def create_job(
    conn: psycopg.AsyncConnection[Any], *, source: str, kind: str, sigma: float, direction: str
) -> int:
    """A new running job; its id names the job's versions (``model_versions.fit_job``)."""
    cur = await conn.execute(
        "INSERT INTO fit_jobs (source, kind, sigma, direction) VALUES (%s, %s, %s, %s)"
        " RETURNING id",
        (source, kind, sigma, direction),
    )
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def finish_job(
    conn: psycopg.AsyncConnection[Any],
    job: int,
    *,
    failed: bool,
    refused: int,
    refusals: list[dict[str, str]],
    seconds: float,
) -> None:
    """Record the job's end: from then on the tracker logs its MLflow run."""
    await conn.execute(
        "UPDATE fit_jobs SET status = %s, refused = %s, refusals = %s::jsonb, seconds = %s,"
        " finished_at = now(), updated_at = now() WHERE id = %s",
        (
            "failed" if failed else "finished",
            refused,
            orjson.dumps(refusals).decode(),
            seconds,
            job,
        ),
    )
