"""A retention pass over the anomaly history: the plain table of earlier releases (rows deleted
in batches of 10,000) against the table partitioned by day (whole days dropped).

``python -m bench.retention_partitions [--rows 2000000] [--days 30] [--keep 10]`` starts its own
throwaway PostgreSQL, writes the same ``--rows`` anomalies spread evenly over the last
``--days`` days into each table (one database each, the same indexes), then times one pass
keeping ``--keep`` days, so it removes the oldest ``days - keep`` days' rows, and prints both
times, their ratio, the tables' sizes before and after (a delete leaves the space to
vacuum; a dropped partition gives it back) and the WAL each pass wrote (what replicas and
backups receive). The plain table's pass cuts at the very second,
the partitioned one at whole days: it keeps the rows of the day the cut-off falls in. Last, a
third database gets the plain table with the same rows, and the time the schema takes to
convert it (what the first start of a release with the partitioned history does).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
from pathlib import Path

import psycopg
from psycopg import sql

from detector.settings import Settings
from detector.store.connections import apply_schema_sync, postgres_pool
from detector.store.retention import run_retention
from embedded.processes import free_port
from embedded.servers import PostgresServer

# The previous releases' table and indexes, and their retention delete (ids grow with time:
# each round deletes the old rows of the 10,000 lowest ids, until a round finds none).
_PLAIN = """
CREATE TABLE anomalies (
    id bigserial PRIMARY KEY, series_id text NOT NULL, ts bigint NOT NULL,
    value double precision NOT NULL, model_version integer NOT NULL,
    mean double precision NOT NULL, std double precision NOT NULL,
    lower_bound double precision NOT NULL, upper_bound double precision NOT NULL,
    score double precision NOT NULL, source text NOT NULL, source_id text, episode_id text,
    detected_at timestamptz NOT NULL DEFAULT now(), source_stream text NOT NULL DEFAULT '',
    onset boolean, test text
);
CREATE UNIQUE INDEX anomalies_source_key ON anomalies (source_stream, source_id);
CREATE INDEX anomalies_series_ts ON anomalies (series_id, ts);
CREATE INDEX anomalies_episode ON anomalies (episode_id) WHERE onset;
"""
_PLAIN_DELETE = """
WITH head AS (SELECT id, detected_at FROM anomalies ORDER BY id LIMIT %(batch)s)
DELETE FROM anomalies a USING head
WHERE a.id = head.id AND head.detected_at < now() - make_interval(days => %(days)s)
"""
_BATCH = 10_000

# N readings' anomalies over the last D days, in time order, 100,000 series, an episode
# opener every tenth; detected when they happened.
_FILL = """
INSERT INTO anomalies (series_id, ts, value, model_version, mean, std, lower_bound,
    upper_bound, score, source, source_stream, source_id, episode_id, onset, test, detected_at)
SELECT 'series-' || (n %% 100000), t, 9.5, 1, 1, 0.5, -0.5, 2.5, 17, 'stream', 'readings',
    n::text, (n - n %% 10)::text, n %% 10 = 0, 'point', to_timestamp(t)
FROM generate_series(%(first)s, %(last)s) AS n,
    LATERAL (SELECT %(start)s::bigint + n::bigint * %(span)s / %(rows)s AS t) AS at
"""
_CHUNK = 500_000

# The table and its indexes, with every partition's (a plain table is no partition tree).
_SIZE = """
SELECT coalesce(sum(pg_total_relation_size(relid)), pg_total_relation_size('anomalies'))
FROM pg_partition_tree('anomalies')
"""


def fill(conn: psycopg.Connection, rows: int, days: int) -> float:
    """Write the rows in chunks; the seconds it took."""
    now = int(time.time())
    span, started = days * 86_400, time.perf_counter()
    for first in range(1, rows + 1, _CHUNK):
        conn.execute(
            _FILL,
            {
                "first": first,
                "last": min(first + _CHUNK - 1, rows),
                "start": now - span,
                "span": span,
                "rows": rows,
            },
        )
    conn.execute("ANALYZE anomalies")
    return time.perf_counter() - started


def size_and_count(conn: psycopg.Connection) -> tuple[int, int]:
    size = conn.execute(_SIZE).fetchone()
    count = conn.execute("SELECT count(*) FROM anomalies").fetchone()
    assert size is not None and count is not None
    return int(size[0]), int(count[0])


def plain_pass(conn: psycopg.Connection, keep: int) -> float:
    started = time.perf_counter()
    while conn.execute(_PLAIN_DELETE, {"batch": _BATCH, "days": keep}).rowcount == _BATCH:
        pass
    took = time.perf_counter() - started
    print(f"  pass {took:.2f} s", end="")
    started = time.perf_counter()
    conn.execute("VACUUM anomalies")  # what makes the space reusable (autovacuum's work)
    print(f", then VACUUM {time.perf_counter() - started:.2f} s")
    return took


def partitioned_pass(settings: Settings) -> float:
    async def go() -> float:
        pool = postgres_pool(settings)
        await pool.open()
        try:
            started = time.perf_counter()
            done = await run_retention(pool, settings)
            took = time.perf_counter() - started
            print(f"  pass {took:.2f} s: {done}")
            return took
        finally:
            await pool.close()

    return asyncio.run(go())


def mib(size: int) -> str:
    return f"{size / 2**20:,.0f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--keep", type=int, default=10)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="retention-partitions-"))
    root.chmod(0o755)
    postgres = PostgresServer(root / "pg" / "data", free_port()).start()
    try:
        base = Settings(
            **postgres.settings_fields(),
            retention_anomalies_days=args.keep,
            retention_training_versions=0,
            retention_outbox_days=0,
            retention_outbox_max_rows=0,
        )
        with psycopg.connect(postgres.conninfo("postgres"), autocommit=True) as admin:
            for name in ("plain", "partitioned", "converted"):
                admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        plain = base.model_copy(update={"postgres_db": "plain"})
        partitioned = base.model_copy(update={"postgres_db": "partitioned"})
        apply_schema_sync(partitioned.postgres_conninfo())
        print(f"{args.rows:,} anomalies over {args.days} days; a pass keeping {args.keep} days")
        times: dict[str, float] = {}
        for name, settings in (("plain", plain), ("partitioned", partitioned)):
            with psycopg.connect(settings.postgres_conninfo(), autocommit=True) as conn:
                if name == "plain":
                    conn.execute(_PLAIN)
                else:  # the days' partitions, as the writers and the retention pass make them
                    conn.execute(
                        "SELECT anomalies_day_partition(d) FROM generate_series("
                        "floor(extract(epoch FROM now()) / 86400)::bigint - %s,"
                        "floor(extract(epoch FROM now()) / 86400)::bigint + 2) AS d",
                        (args.days,),
                    )
                wrote = fill(conn, args.rows, args.days)
                size, count = size_and_count(conn)
                print(f"{name}: written in {wrote:.1f} s, {count:,} rows, {mib(size)}")
                wal = conn.execute("SELECT pg_current_wal_lsn()").fetchone()
                if name == "plain":
                    times[name] = plain_pass(conn, args.keep)
                else:
                    times[name] = partitioned_pass(settings)
                written = conn.execute(
                    "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s)", (wal[0] if wal else 0,)
                ).fetchone()
                size, count = size_and_count(conn)
                print(
                    f"  after: {count:,} rows, {mib(size)};"
                    f" WAL written since the pass began: {mib(int(written[0]) if written else 0)}"
                )
        ratio = times["plain"] / max(times["partitioned"], 1e-9)
        print(f"partitioned pass {ratio:,.0f}x faster than deleting the rows")
        converted = base.model_copy(update={"postgres_db": "converted"}).postgres_conninfo()
        with psycopg.connect(converted, autocommit=True) as conn:
            conn.execute(_PLAIN)
            fill(conn, args.rows, args.days)
        started = time.perf_counter()
        apply_schema_sync(converted)
        print(f"converting the plain table: {time.perf_counter() - started:.1f} s")
    finally:
        postgres.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
