"""Training points in PostgreSQL: one row of two arrays a version, read back exactly; versions
stored a row a point (before the arrays) still read, plotted and trimmed."""

from __future__ import annotations

import asyncio
import uuid

import httpx
import numpy as np
import psycopg

from detector.settings import Settings
from detector.store.connections import postgres_pool
from detector.store.connections import redis_client as async_redis_client
from detector.store.models import ModelStore
from detector.store.retention import run_retention


def training(settings: Settings, series_id: str, version: int) -> tuple[list[int], list[float]]:
    async def go() -> tuple[list[int], list[float]]:
        r, pool = async_redis_client(settings), postgres_pool(settings)
        await pool.open()
        try:
            data = await ModelStore(r, pool).training_data(series_id, version)
            return data.timestamps.tolist(), data.values.tolist()
        finally:
            await pool.close()
            await r.aclose()

    return asyncio.run(go())


def model_id(pg: psycopg.Connection, series_id: str, version: int) -> int:
    row = pg.execute(
        "SELECT id FROM model_versions WHERE series_id = %s AND version = %s", (series_id, version)
    ).fetchone()
    assert row is not None
    return int(row[0])


def test_a_fit_stores_one_row_of_arrays_and_reads_back_every_point_exactly(
    settings: Settings, client: httpx.Client, pg: psycopg.Connection
) -> None:
    series_id = f"tp-{uuid.uuid4().hex[:10]}"
    rng = np.random.default_rng(3)
    ts = (1_700_000_000 + np.cumsum(rng.integers(1, 600, 50_000))).tolist()
    values = (rng.normal(0, 1, 50_000) * 10.0 ** rng.integers(-300, 150, 50_000)).tolist()
    order = rng.permutation(len(ts))
    answer = client.post(
        f"/fit/{series_id}",
        json={"timestamps": [ts[i] for i in order], "values": [values[i] for i in order]},
    )
    assert answer.status_code == 200, answer.text
    mid = model_id(pg, series_id, 1)
    (rows,) = pg.execute(
        "SELECT count(*) FROM training_arrays WHERE model_id = %s", (mid,)
    ).fetchone() or (0,)
    (legacy,) = pg.execute(
        "SELECT count(*) FROM training_points WHERE model_id = %s", (mid,)
    ).fetchone() or (0,)
    assert (rows, legacy) == (1, 0)
    assert training(settings, series_id, 1) == (ts, values)  # sorted by timestamp, exact
    (stored,) = pg.execute(
        "SELECT pg_column_size(ts) + pg_column_size(value) FROM training_arrays"
        " WHERE model_id = %s",
        (mid,),
    ).fetchone() or (0,)
    assert stored <= 16 * len(ts) + 64  # 16 bytes a point


def test_a_version_stored_a_row_a_point_is_still_read_plotted_and_trimmed(
    settings: Settings, client: httpx.Client, pg: psycopg.Connection
) -> None:
    series_id = f"tp-{uuid.uuid4().hex[:10]}"
    ts, values = list(range(1000, 1500)), [float(i % 7) for i in range(500)]
    assert client.post(f"/fit/{series_id}", json={"timestamps": ts, "values": values}).is_success
    mid = model_id(pg, series_id, 1)
    # As a database from before the arrays holds it: a row a point, no arrays.
    pg.execute(
        "INSERT INTO training_points (model_id, ts, value)"
        " SELECT model_id, p.ts, p.value FROM training_arrays, unnest(ts, value) AS p(ts, value)"
        " WHERE model_id = %s",
        (mid,),
    )
    pg.execute("DELETE FROM training_arrays WHERE model_id = %s", (mid,))
    assert training(settings, series_id, 1) == (ts, values)
    plot = client.get("/plot", params={"series_id": series_id})
    assert plot.status_code == 200 and plot.content[:4] == b"\x89PNG"

    for _ in range(2):  # two newer versions: retention keeping one trims both older ones
        assert client.post(
            f"/fit/{series_id}", json={"timestamps": ts, "values": values}
        ).is_success
    # Anomalies kept: the session's other tests record readings of 1970, which a pass keeping
    # 30 days of readings' time would remove.
    trim = settings.model_copy(
        update={"retention_training_versions": 1, "retention_anomalies_days": 0}
    )

    async def retention() -> None:
        pool = postgres_pool(trim)
        await pool.open()
        try:
            await run_retention(pool, trim)
        finally:
            await pool.close()

    asyncio.run(retention())
    left = pg.execute(
        "SELECT m.version, count(p.ts) FROM model_versions m"
        " LEFT JOIN training_point_rows p ON p.model_id = m.id"
        " WHERE m.series_id = %s GROUP BY m.version ORDER BY m.version",
        (series_id,),
    ).fetchall()
    assert left == [(1, 0), (2, 0), (3, 500)]
