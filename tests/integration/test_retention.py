"""Retention against a real PostgreSQL of this module's own (a pass deletes across all series,
so it must not touch the rows of the session's other tests): rows inserted with old
timestamps go, recent ones stay, and /plot says when a version's points are gone."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Iterator

import httpx
import psycopg
import pytest

from detector.settings import Settings
from detector.store.connections import postgres_pool
from detector.store.retention import RetentionPass, run_retention
from embedded.servers import PostgresServer, RedisServer
from tests.support.services import start_api


@pytest.fixture(scope="module")
def rs(redis_server: RedisServer, fault_postgres: PostgresServer) -> Settings:
    # The job's own timer never fires during a test: passes are run by the tests.
    return Settings(
        **redis_server.settings_fields(),
        **fault_postgres.settings_fields(),
        retention_interval_seconds=0,
    )


@pytest.fixture
def db(rs: Settings) -> Iterator[psycopg.Connection]:
    with psycopg.connect(rs.postgres_conninfo(), autocommit=True) as conn:
        yield conn


def retention_pass(s: Settings) -> RetentionPass | None:
    async def go() -> RetentionPass | None:
        pool = postgres_pool(s)
        await pool.open()
        try:
            return await run_retention(pool, s)
        finally:
            await pool.close()

    return asyncio.run(go())


def insert_anomalies(db: psycopg.Connection, series_id: str, count: int, age_days: float) -> None:
    """``count`` anomalies of readings ``age_days`` old (retention goes by the reading's time),
    a second apart; straight into the table, so they land where no writer made a partition."""
    db.execute(
        "INSERT INTO anomalies (series_id, ts, value, model_version, mean, std, lower_bound,"
        " upper_bound, score, source, source_stream, source_id, detected_at)"
        " SELECT %s, extract(epoch FROM now() - make_interval(days => %s))::bigint - n,"
        " 1, 1, 0, 1, -3, 3, 1, 'stream', %s, n::text, now()"
        " FROM generate_series(1, %s) AS n",
        (series_id, age_days, f"{series_id}:{age_days}", count),
    )


def anomaly_count(db: psycopg.Connection, series_id: str) -> int:
    row = db.execute("SELECT count(*) FROM anomalies WHERE series_id = %s", (series_id,)).fetchone()
    return int(row[0]) if row else 0


def test_old_anomalies_are_deleted_in_batches_recent_ones_kept(
    rs: Settings, db: psycopg.Connection
) -> None:
    old, recent = f"ret-{uuid.uuid4().hex[:8]}", f"ret-{uuid.uuid4().hex[:8]}"
    insert_anomalies(db, old, 25_000, age_days=40)  # more than one batch
    insert_anomalies(db, recent, 100, age_days=29)
    done = retention_pass(rs)
    assert done is not None and done.anomalies >= 25_000
    assert anomaly_count(db, old) == 0
    assert anomaly_count(db, recent) == 100
    keep_all = retention_pass(rs.model_copy(update={"retention_anomalies_days": 0}))
    assert keep_all is not None and keep_all.anomalies == 0


def test_only_one_process_runs_a_pass_at_a_time(rs: Settings, db: psycopg.Connection) -> None:
    series_id = f"ret-{uuid.uuid4().hex[:8]}"
    insert_anomalies(db, series_id, 10, age_days=40)
    with psycopg.connect(rs.postgres_conninfo(), autocommit=True) as other:
        other.execute("SELECT pg_advisory_lock(%s)", (0x72657465,))  # another process' pass
        assert retention_pass(rs) is None
        assert anomaly_count(db, series_id) == 10
    assert retention_pass(rs) is not None
    assert anomaly_count(db, series_id) == 0


def test_old_versions_lose_their_points_but_stay_listed_and_plot_says_410(
    rs: Settings, db: psycopg.Connection
) -> None:
    series_id = f"ret-{uuid.uuid4().hex[:8]}"
    proc, url = start_api(rs)
    try:
        with httpx.Client(base_url=url, timeout=60) as http:
            for n in range(5):
                values = [float(v + n) for v in (10, 12, 11, 13, 9, 14)]
                body = {"timestamps": list(range(len(values))), "values": values}
                assert http.post(f"/fit/{series_id}", json=body).status_code == 200
            done = retention_pass(rs)
            assert done is not None and done.versions_trimmed >= 2
            stored = db.execute(
                "SELECT m.version, count(p.model_id) FROM model_versions m"
                " LEFT JOIN training_point_rows p ON p.model_id = m.id"
                " WHERE m.series_id = %s GROUP BY m.version ORDER BY m.version",
                (series_id,),
            ).fetchall()
            assert stored == [(1, 0), (2, 0), (3, 6), (4, 6), (5, 6)]
            listed = http.get(f"/models/{series_id}").json()["versions"]
            assert [v["version"] for v in listed] == [f"v{n}.0.0" for n in range(1, 6)]
            gone = http.get("/plot", params={"series_id": series_id, "version": "2"})
            assert gone.status_code == 410, gone.text
            assert "deleted by retention" in gone.json()["detail"]
            assert http.get("/plot", params={"series_id": series_id, "version": "3"}).is_success
            # The old version's model is still served.
            answer = http.post(
                f"/predict/{series_id}", params={"version": "1"}, json={"timestamp": 1, "value": 0}
            )
            assert answer.json() == {"anomaly": False, "model_version": "v1.0.0"}
        again = retention_pass(rs)
        assert again is not None and again.training_points == 0  # nothing left to do
    finally:
        proc.terminate()
        proc.wait(30)


def test_outbox_rows_waiting_too_long_or_beyond_the_cap_are_dropped_with_a_warning(
    rs: Settings, db: psycopg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    series_id = f"ret-{uuid.uuid4().hex[:8]}"
    db.execute("DELETE FROM mlflow_outbox")
    db.execute("INSERT INTO series (series_id, last_version) VALUES (%s, 6)", (series_id,))
    ids = []
    for version in range(1, 7):
        row = db.execute(
            "INSERT INTO model_versions (series_id, version, mean, std, sigma, direction,"
            " points_used, first_ts, last_ts, min_value, max_value)"
            " VALUES (%s, %s, 0, 1, 3, 'above', 3, 0, 2, 0, 1) RETURNING id",
            (series_id, version),
        ).fetchone()
        assert row is not None
        ids.append(int(row[0]))
    for model_id, age in zip(ids, [40, 31, 5, 4, 3, 0], strict=True):
        db.execute(
            "INSERT INTO mlflow_outbox (model_id, created_at)"
            " VALUES (%s, now() - make_interval(days => %s))",
            (model_id, age),
        )
    capped = rs.model_copy(update={"retention_outbox_max_rows": 3})
    with caplog.at_level(logging.WARNING, logger="detector.store.retention"):
        done = retention_pass(capped)
    assert done is not None and (done.outbox_expired, done.outbox_overflow) == (2, 1)
    left = [r[0] for r in db.execute("SELECT model_id FROM mlflow_outbox ORDER BY model_id")]
    assert left == ids[3:]
    assert "their runs will not be logged" in caplog.text
    # The versions themselves stay.
    versions = db.execute("SELECT count(*) FROM model_versions WHERE series_id = %s", (series_id,))
    assert versions.fetchone() == (6,)
