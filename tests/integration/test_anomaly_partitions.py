"""The anomaly history's day partitions, against a real PostgreSQL of this module's own (a
retention pass drops days across all series, and the migration tests make databases of their
own): partitions made on demand, the default partition and a later partition taking its rows,
retention dropping old days, redeliveries still de-duplicated, and the plain table of an
older deployment converted."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import psycopg
import pytest
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from detector.settings import Settings
from detector.store import partitions
from detector.store.connections import apply_schema_sync, postgres_pool
from detector.store.feedback import find_episode
from detector.store.history import query_anomalies, query_episodes, record_anomalies
from detector.store.retention import run_retention
from embedded.servers import PostgresServer

DAY = partitions.DAY_SECONDS
T = TypeVar("T")


@pytest.fixture(scope="module")
def ps(fault_postgres: PostgresServer) -> Settings:
    return Settings(**fault_postgres.settings_fields(), retention_interval_seconds=0)


@pytest.fixture
def db(ps: Settings) -> Iterator[psycopg.Connection]:
    with psycopg.connect(ps.postgres_conninfo(), autocommit=True) as conn:
        yield conn


@pytest.fixture(autouse=True)
def fresh_process() -> None:
    """Each test as a process of its own: no days known from an earlier test (whose
    partitions a retention pass may have dropped since)."""
    partitions._known.clear()


def with_pool(s: Settings, use: Callable[[AsyncConnectionPool], Awaitable[T]]) -> T:
    async def go() -> T:
        pool = postgres_pool(s)
        await pool.open()
        try:
            return await use(pool)
        finally:
            await pool.close()

    return asyncio.run(go())


def event(series_id: str, ts: int, source_id: str, **extra: str) -> dict[str, str]:
    return {
        "series_id": series_id,
        "timestamp": str(ts),
        "value": "9.5",
        "model_version": "v1.0.0",
        "mean": "1.0",
        "std": "0.5",
        "lower": "-0.5",
        "upper": "2.5",
        "score": "17.0",
        "source_id": source_id,
        "detected_at": f"{time.time():.6f}",
        **extra,
    }


def record(s: Settings, stream: str, events: list[dict[str, str]], retention_days: int) -> None:
    with_pool(s, lambda pool: record_anomalies(pool, stream, events, retention_days=retention_days))


def homes(db: psycopg.Connection, stream: str) -> dict[str, str]:
    """Source id → the partition its row is in."""
    rows = db.execute(
        "SELECT source_id, tableoid::regclass::text FROM anomalies WHERE source_stream = %s",
        (stream,),
    ).fetchall()
    return {r[0]: r[1] for r in rows}


def day_name(day: int) -> str:
    return "anomalies_d" + time.strftime("%Y%m%d", time.gmtime(day * DAY))


def day_partitions(db: psycopg.Connection) -> set[str]:
    rows = db.execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = 'anomalies'::regclass"
    ).fetchall()
    return {r[0] for r in rows} - {"anomalies_default"}


def today() -> int:
    return int(time.time()) // DAY


def test_a_writer_makes_the_partitions_of_the_days_it_writes_within_its_window(
    ps: Settings, db: psycopg.Connection
) -> None:
    stream, day = f"part-{uuid.uuid4().hex[:8]}", today()
    days = {"today": day, "yesterday": day - 1, "month": day - 29, "ahead": day + 2}
    beyond = {"old": day - 45, "future": day + 3, "fuzzed": 2**62 // DAY, "epoch": 0}
    events = [event("s", d * DAY + 7, name) for name, d in {**days, **beyond}.items()]
    record(ps, stream, events, retention_days=30)
    found = homes(db, stream)
    assert found == {
        **{name: day_name(d) for name, d in days.items()},
        **dict.fromkeys(beyond, "anomalies_default"),
    }
    # Known days are not asked about again: a partition dropped behind the writer's back
    # (which retention never does to a day in the window) only sends the day to the default.
    db.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(day_name(day - 1))))
    with_pool(
        ps,
        lambda pool: record_anomalies(
            pool, stream, [event("s", (day - 1) * DAY + 9, "again")], retention_days=30
        ),
    )
    assert homes(db, stream)["again"] == "anomalies_default"


def test_the_default_partition_catches_readings_and_a_later_partition_takes_them_over(
    ps: Settings, db: psycopg.Connection
) -> None:
    stream, later = f"part-{uuid.uuid4().hex[:8]}", today() + 6
    series_id = f"s-{uuid.uuid4().hex[:8]}"
    events = [
        event(series_id, later * DAY + n * 600, f"r{n}", episode_id="r0", onset=str(int(n == 0)))
        for n in range(5)
    ] + [event(series_id, 2**62, "fuzzed"), event(series_id, 2**62 - 1, "fuzzed-2")]
    record(ps, stream, events, retention_days=30)
    assert set(homes(db, stream).values()) == {"anomalies_default"}

    async def history(pool: AsyncConnectionPool) -> tuple[Any, ...]:
        return (
            await query_anomalies(pool, series_id),
            await query_episodes(pool, series_id),
        )

    before = with_pool(ps, history)
    assert len(before[0]) == 7
    # The day comes close: the retention pass (or a writer) makes its partition, which takes
    # the default partition's rows of that day in the same transaction.
    assert db.execute("SELECT anomalies_day_partition(%s)", (later,)).fetchone() == (True,)
    assert db.execute("SELECT anomalies_day_partition(%s)", (later,)).fetchone() == (False,)
    found = homes(db, stream)
    assert {found[f"r{n}"] for n in range(5)} == {day_name(later)}
    assert found["fuzzed"] == found["fuzzed-2"] == "anomalies_default"
    assert with_pool(ps, history) == before
    # A redelivered batch, now routed to the new partition, is still recorded once.
    record(ps, stream, events, retention_days=30)
    assert with_pool(ps, history) == before


def test_redelivered_anomalies_are_recorded_once(ps: Settings, db: psycopg.Connection) -> None:
    stream, day = f"part-{uuid.uuid4().hex[:8]}", today()
    events = [event("s", day * DAY + n, f"{n}-0") for n in range(50)]
    record(ps, stream, events, retention_days=30)
    partitions._known.clear()  # a restarted worker
    record(ps, stream, [*events, event("s", day * DAY + 99, "new")], retention_days=30)
    # The same entry id on another stream is another reading.
    record(ps, f"{stream}-other", events[:1], retention_days=30)
    assert len(homes(db, stream)) == 51
    assert len(homes(db, f"{stream}-other")) == 1


def test_writers_racing_for_a_day_all_succeed_and_the_day_takes_the_default_rows(
    ps: Settings, db: psycopg.Connection
) -> None:
    stream, day = f"part-{uuid.uuid4().hex[:8]}", today() - 20
    db.execute(  # written while the day had no partition
        "INSERT INTO anomalies (series_id, ts, value, model_version, mean, std, lower_bound,"
        " upper_bound, score, source, source_stream, source_id)"
        " SELECT 's', %s + n, 1, 1, 0, 1, -3, 3, 1, 'stream', %s, 'early-' || n"
        " FROM generate_series(1, 100) AS n",
        (day * DAY, stream),
    )

    async def race() -> None:
        pools = [postgres_pool(ps) for _ in range(4)]
        for pool in pools:
            await pool.open()
        try:
            await asyncio.gather(
                *(
                    record_anomalies(
                        pool,
                        stream,
                        [event("s", day * DAY + 500 + n, f"w{n}-{k}") for k in range(10)],
                        retention_days=30,
                    )
                    for n, pool in enumerate(pools)
                )
            )
        finally:
            for pool in pools:
                await pool.close()

    asyncio.run(race())
    found = homes(db, stream)
    assert len(found) == 140
    assert set(found.values()) == {day_name(day)}


def test_a_partition_not_had_in_time_never_fails_the_insert(
    ps: Settings, db: psycopg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    stream, day = f"part-{uuid.uuid4().hex[:8]}", today() - 21
    with psycopg.connect(ps.postgres_conninfo(), autocommit=True) as other:
        other.execute("SELECT pg_advisory_lock(%s)", (0x616E7061,))  # a maker that hangs
        with caplog.at_level(logging.WARNING, logger="detector.store.partitions"):
            record(ps, stream, [event("s", day * DAY + 1, "first")], retention_days=30)
        assert "no partition for day" in caplog.text
    assert homes(db, stream) == {"first": "anomalies_default"}
    # Not taken for made: the next batch asks again, and the day takes the earlier row.
    record(ps, stream, [event("s", day * DAY + 2, "second")], retention_days=30)
    assert homes(db, stream) == dict.fromkeys(["first", "second"], day_name(day))


def test_retention_drops_the_days_older_than_kept_and_the_default_partitions_old_rows(
    ps: Settings, db: psycopg.Connection
) -> None:
    stream, day = f"part-{uuid.uuid4().hex[:8]}", today()
    ages = [40, 35, 31, 29, 1, 0]
    record(ps, stream, [event("s", (day - a) * DAY + 3, f"age-{a}") for a in ages], 100)
    # Older than any writer's window at 30 days: these land in the default partition.
    record(ps, stream, [event("s", (day - 50) * DAY + n, f"default-{n}") for n in range(3)], 30)
    record(ps, stream, [event("s", 2**62, "far-future")], 30)
    assert {day_name(day - a) for a in ages} <= day_partitions(db)
    kept = ps.model_copy(update={"retention_anomalies_days": 30})
    done = with_pool(kept, lambda pool: run_retention(pool, kept))
    assert done is not None  # (other tests' rows of the default partition may go too)
    assert done.anomaly_days >= 3 and done.anomalies >= 3
    left = day_partitions(db)
    assert not {day_name(day - a) for a in (40, 35, 31)} & left
    assert {day_name(day - a) for a in (29, 1, 0)} | {day_name(day + n) for n in (1, 2)} <= left
    assert set(homes(db, stream)) == {"age-29", "age-1", "age-0", "far-future"}
    again = with_pool(kept, lambda pool: run_retention(pool, kept))
    assert again is not None and (again.anomaly_days, again.anomalies) == (0, 0)


# ---------------------------------------------------------------- an older deployment's table

# The table as the previous releases made it: the oldest lacks the columns added since.
_LEGACY = """
CREATE TABLE anomalies (
    id            bigserial PRIMARY KEY,
    series_id     text NOT NULL,
    ts            bigint NOT NULL,
    value         double precision NOT NULL,
    model_version integer NOT NULL,
    mean          double precision NOT NULL,
    std           double precision NOT NULL,
    lower_bound   double precision NOT NULL,
    upper_bound   double precision NOT NULL,
    score         double precision NOT NULL,
    source        text NOT NULL,
    source_id     text,
    episode_id    text,
    detected_at   timestamptz NOT NULL DEFAULT now()
);
"""
_LEGACY_LATEST = """
ALTER TABLE anomalies ADD COLUMN IF NOT EXISTS source_stream text NOT NULL DEFAULT '';
CREATE UNIQUE INDEX IF NOT EXISTS anomalies_source_key ON anomalies (source_stream, source_id);
CREATE INDEX IF NOT EXISTS anomalies_series_ts ON anomalies (series_id, ts);
ALTER TABLE anomalies ADD COLUMN IF NOT EXISTS onset boolean;
ALTER TABLE anomalies ADD COLUMN IF NOT EXISTS test text;
CREATE INDEX IF NOT EXISTS anomalies_episode ON anomalies (episode_id) WHERE onset;
"""


@pytest.fixture
def legacy_db(fault_postgres: PostgresServer, ps: Settings) -> Iterator[Settings]:
    """A database of its own, empty (no schema applied)."""
    name = f"legacy_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(fault_postgres.conninfo("postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield ps.model_copy(update={"postgres_db": name})
    with psycopg.connect(fault_postgres.conninfo("postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def fill_legacy(conn: psycopg.Connection, *, latest: bool) -> None:
    """The old table with 3,000 rows over 60 days, then readings of a year ago, of 1970 and
    of the far future."""
    conn.execute(_LEGACY + (_LEGACY_LATEST if latest else ""))
    now = int(time.time())
    columns = "series_id, ts, value, model_version, mean, std, lower_bound, upper_bound, score"
    extra = ", source_stream, onset, test" if latest else ""
    values = ", 'readings', n %% 10 = 0, 'point'" if latest else ""
    conn.execute(
        f"INSERT INTO anomalies ({columns}, source, source_id, episode_id{extra})"
        f" SELECT 's' || (n %% 3), %s - n * 1728, n * 0.5, 1 + n %% 2, 1, 2, -5, 7, n,"
        f" CASE WHEN n %% 7 = 0 THEN 'backfill' ELSE 'stream' END, n::text,"
        f" (n - n %% 10)::text{values}"
        f" FROM generate_series(1, 3000) AS n",
        (now,),
    )
    conn.execute(
        f"INSERT INTO anomalies ({columns}, source, source_id) VALUES"
        " ('s0', %s, 1, 1, 1, 2, -5, 7, 1, 'stream', 'last-year'),"
        " ('s0', 0, 1, 1, 1, 2, -5, 7, 1, 'stream', 'epoch'),"
        " ('s1', 4611686018427387904, 1, 1, 1, 2, -5, 7, 1, 'stream', 'far')",
        (now - 400 * DAY,),
    )


_ROWS = "SELECT * FROM anomalies ORDER BY id"


async def answers(pool: AsyncConnectionPool) -> list[Any]:
    """What the history queries answer, for every series and source."""
    out: list[Any] = []
    for series_id in ("s0", "s1", "s2"):
        for source in ("stream", "backfill"):
            out.append(await query_anomalies(pool, series_id, source=source, limit=10_000))
            out.append(await query_episodes(pool, series_id, source=source, limit=10_000))
    return out


@pytest.mark.parametrize("latest", [True, False], ids=["previous-release", "oldest"])
def test_an_older_deployments_plain_table_is_converted_with_every_row(
    legacy_db: Settings, latest: bool
) -> None:
    conninfo = legacy_db.postgres_conninfo()
    with psycopg.connect(conninfo, autocommit=True) as conn:
        fill_legacy(conn, latest=latest)
        rows = conn.execute(_ROWS).fetchall()
        if not latest:  # what the columns added since read as once they exist
            rows = [(*r, "", None, None) for r in rows]
        rows = [(*r, None) for r in rows]  # base_score, which neither release had
    before = with_pool(legacy_db, answers) if latest else None
    apply_schema_sync(conninfo)
    apply_schema_sync(conninfo)  # a later start: nothing left to do
    with psycopg.connect(conninfo, autocommit=True) as conn:
        kind = conn.execute("SELECT relkind FROM pg_class WHERE relname = 'anomalies'")
        assert kind.fetchone() == ("p",)
        assert conn.execute("SELECT to_regclass('anomalies_legacy')").fetchone() == (None,)
        assert conn.execute(_ROWS).fetchall() == rows
        # The rows of the last year are in their days' partitions, the rest in the default.
        placed = conn.execute("SELECT source_id, ts, tableoid::regclass::text FROM anomalies")
        homes = {r[0]: (r[2], r[1]) for r in placed}
        assert {k for k, (home, _) in homes.items() if home == "anomalies_default"} == {
            "last-year",
            "epoch",
            "far",
        }
        assert all(
            home == day_name(ts // DAY)
            for home, ts in homes.values()
            if home != "anomalies_default"
        )
        # Ids carry on from the old table's sequence.
        assert conn.execute("SELECT nextval('anomalies_id_seq')").fetchone() == (3004,)
        assert conn.execute("SELECT pg_get_serial_sequence('anomalies', 'id')").fetchone() == (
            "public.anomalies_id_seq",
        )
    if before is not None:
        assert with_pool(legacy_db, answers) == before

        async def opener(pool: AsyncConnectionPool) -> Any:
            return await find_episode(pool, "20", "s2")

        assert with_pool(legacy_db, opener).timestamp == rows[19][2]
    # A redelivery of a migrated row is still recognised; a new one gets a fresh id.
    with psycopg.connect(conninfo, autocommit=True) as conn:
        row = conn.execute("SELECT ts FROM anomalies WHERE source_id = '3'").fetchone()
    assert row is not None
    stream = "readings" if latest else ""
    redelivered = [event("s0", int(row[0]), "3"), event("s0", int(time.time()), "new")]
    record(legacy_db, stream, redelivered, retention_days=30)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM anomalies").fetchone() == (3004,)
        new_id = conn.execute("SELECT id FROM anomalies WHERE source_id = 'new'").fetchone()
        assert new_id is not None and new_id[0] > 3004


def test_an_interrupted_conversion_leaves_the_old_table_and_the_next_start_finishes_it(
    legacy_db: Settings,
) -> None:
    conninfo = legacy_db.postgres_conninfo()
    with psycopg.connect(conninfo, autocommit=True) as conn:
        fill_legacy(conn, latest=True)
        rows = conn.execute(_ROWS).fetchall()
    failed: list[BaseException] = []

    def convert() -> None:
        try:
            apply_schema_sync(conninfo)
        except psycopg.Error as exc:
            failed.append(exc)

    with psycopg.connect(conninfo, autocommit=True) as blocker:
        # Another process making a partition: the conversion waits for it, mid-way.
        blocker.execute("SELECT pg_advisory_lock(%s)", (0x616E7061,))
        worker = threading.Thread(target=convert)
        worker.start()
        deadline = time.monotonic() + 30
        while True:
            waiting = blocker.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock' AND wait_event = 'advisory'"
            ).fetchall()
            if waiting or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert len(waiting) == 1
        blocker.execute("SELECT pg_terminate_backend(%s)", (waiting[0][0],))  # the process dies
        worker.join(30)
    assert failed
    with psycopg.connect(conninfo, autocommit=True) as conn:
        kind = conn.execute("SELECT relkind FROM pg_class WHERE relname = 'anomalies'")
        assert kind.fetchone() == ("r",)
        assert conn.execute(_ROWS).fetchall() == rows
    apply_schema_sync(conninfo)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        kind = conn.execute("SELECT relkind FROM pg_class WHERE relname = 'anomalies'")
        assert kind.fetchone() == ("p",)
        assert conn.execute(_ROWS).fetchall() == [(*r, None) for r in rows]  # and base_score


def test_converting_an_empty_table_is_quick(legacy_db: Settings) -> None:
    conninfo = legacy_db.postgres_conninfo()
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(_LEGACY + _LEGACY_LATEST)
    started = time.perf_counter()
    apply_schema_sync(conninfo)
    assert time.perf_counter() - started < 10
    with psycopg.connect(conninfo, autocommit=True) as conn:
        assert day_partitions(conn) == set()
        assert conn.execute("SELECT count(*) FROM anomalies").fetchone() == (0,)
