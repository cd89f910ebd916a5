"""Store growth and one retention pass: N fits of M points on one series, sizes before and after.

``python -m bench.retention_growth [--fits 200] [--points 10000]`` starts its own throwaway
Redis and PostgreSQL, fits through ``ModelStore`` (the API's write path, without HTTP), then
runs one retention pass with the default settings and prints the row counts and sizes.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from detector.kinds.static import fit_static
from detector.kinds.training import prepare_training_data
from detector.settings import Settings
from detector.store.connections import apply_schema, postgres_pool, redis_client
from detector.store.models import ModelStore
from detector.store.retention import run_retention
from embedded.processes import free_port
from embedded.servers import PostgresServer, RedisServer

_SIZES = """
SELECT (SELECT count(*) FROM training_point_rows),
       pg_total_relation_size('training_arrays') + pg_total_relation_size('training_points'),
       (SELECT count(*) FROM model_versions)
"""


async def measure(settings: Settings, fits: int, points: int) -> None:
    redis, pool = redis_client(settings), postgres_pool(settings)
    await pool.open()
    try:
        await apply_schema(pool)
        store = ModelStore(redis, pool)
        rng = np.random.default_rng(1)
        timestamps = list(range(points))
        for _ in range(fits):
            data = prepare_training_data(timestamps, rng.normal(50, 5, points).tolist())
            await store.save_fit("growth", data, fit_static(data))
        async with pool.connection() as conn:
            before = await (await conn.execute(_SIZES)).fetchone()
            started = time.perf_counter()
            done = await run_retention(pool, settings)
            took = time.perf_counter() - started
            await conn.execute("VACUUM training_arrays")
            await conn.execute("VACUUM training_points")
            after = await (await conn.execute(_SIZES)).fetchone()
        assert before is not None and after is not None
        print(f"{fits} fits x {points} points, one series")
        print(f"before: {before[0]} training points, {before[1] / 2**20:.1f} MiB")
        print(f"retention pass: {took:.2f} s, {done}")
        print(
            f"after (VACUUM): {after[0]} points, {after[1] / 2**20:.1f} MiB;"
            f" {after[2]} versions still listed"
        )
        await store.publisher.close()
    finally:
        await pool.close()
        await redis.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fits", type=int, default=200)
    parser.add_argument("--points", type=int, default=10_000)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="retention-growth-"))
    root.chmod(0o755)
    redis = RedisServer(root / "redis", free_port(), appendonly=False).start()
    postgres = PostgresServer(root / "pg" / "data", free_port(), durable=False).start()
    try:
        settings = Settings(**redis.settings_fields(), **postgres.settings_fields())
        asyncio.run(measure(settings, args.fits, args.points))
    finally:
        postgres.stop()
        redis.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
