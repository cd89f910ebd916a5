"""PostgreSQL faults against real processes: stopped under load, with and without a worker
running. Predictions go on from Redis, fits answer 503 leaving nothing half-written, readings
stay pending (their delivery budget untouched) and are scored once when it returns."""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
import pytest
import redis

from detector.settings import Settings
from detector.wire.readings import reading_fields
from embedded.servers import PostgresServer
from tests.support.faults import (
    START,
    Feeder,
    Plan,
    account,
    drained,
    fit_body,
    fit_series,
    group_state,
    pg_rows,
    report,
)
from tests.support.polling import wait_for
from tests.support.processes import start_worker, stop_process
from tests.support.services import start_api


@pytest.mark.slow
def test_postgres_stopped_predictions_go_on_and_fits_503_without_half_writes(
    fault_settings: Settings, fault_postgres: PostgresServer, rclient: redis.Redis, tmp_path: Path
) -> None:
    s = fault_settings
    api, base_url = start_api(s)
    other, other_url = start_api(s)
    worker = start_worker(s, "through-pg", tmp_path / "worker.log")
    series: list[str] = []
    outage_fits: list[httpx.Response] = []
    try:
        (known,) = fit_series(base_url, 1)
        (unseen,) = fit_series(other_url, 1)  # never in the first API's memory
        series += [known, unseen]
        # Readings of fitted series published all through the outage, the worker running.
        plan = Plan(fit_series(base_url), 3000)
        feeder = Feeder(s.redis_connection_url(), s.stream_readings, plan, chunk=20, pause=0.05)
        feeder.start()
        with httpx.Client(base_url=base_url, timeout=60) as http:
            answer = http.post(f"/predict/{known}", json={"timestamp": 1, "value": 1})
            assert answer.status_code == 200
            # Fits in flight while PostgreSQL goes down.
            busy = [f"pg-{uuid.uuid4().hex[:8]}" for _ in range(4)]
            series += busy
            stop_fitting = threading.Event()
            answers: list[int] = []

            def keep_fitting(series_id: str) -> None:
                with httpx.Client(base_url=base_url, timeout=60) as own:
                    n = 0
                    while not stop_fitting.is_set():
                        n += 1
                        r = own.post(f"/fit/{series_id}", json=fit_body(20_000, n))
                        answers.append(r.status_code)

            threads = [threading.Thread(target=keep_fitting, args=(b,)) for b in busy]
            for thread in threads:
                thread.start()
            wait_for(lambda: answers.count(200) >= 4, "fits under load")
            fault_postgres.stop()  # fast shutdown: open transactions are cut
            try:
                stop_fitting.set()
                for thread in threads:
                    thread.join(60)
                # Predictions keep working from Redis, also for a model this API never saw.
                predict = http.post(f"/predict/{unseen}", json={"timestamp": 1, "value": 500})
                assert predict.json() == {"anomaly": True, "model_version": "v1.0.0"}
                predict = http.post(
                    f"/predict/{known}", params={"version": "1"}, json={"timestamp": 1, "value": 1}
                )
                assert predict.json() == {"anomaly": False, "model_version": "v1.0.0"}
                # Fits answer 503, saying why.
                for n in range(3):
                    outage_fits.append(http.post(f"/fit/{known}", json=fit_body(1000, n)))
                assert http.get("/healthcheck").status_code == 503
            finally:
                fault_postgres.start()
            # After PostgreSQL returns, fits work again without a restart.
            back = http.post(f"/fit/{known}", json=fit_body(1000, 99))
            assert back.status_code == 200, back.text
            assert back.json()["version"] == "v2.0.0"
        feeder.finish()
        wait_for(lambda: drained(rclient, s, plan), "the worker to drain the stream", 90)
        assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
    finally:
        stop_process(api)
        stop_process(other)
        stop_process(worker)
    # Every reading scored exactly once: an event per anomalous one, only poison dead.
    result = account(rclient, s, plan)
    assert set(answers) <= {200, 503}, Counter(answers)
    for answer in outage_fits:
        assert answer.status_code == 503
        body = answer.json()
        assert body["dependency"] == "postgres"
        assert "PostgreSQL is unavailable, the fit was not stored" in body["detail"]
    # Nothing half-written: every version Redis shows has its rows in PostgreSQL (all points),
    # and the latest pointers agree.
    for series_id in series:
        hot = rclient.hgetall(f"model:{{{series_id}}}")
        durable = {
            int(v): (n, stored)
            for v, n, stored in pg_rows(
                s,
                "SELECT m.version, m.points_used,"
                " (SELECT count(*) FROM training_point_rows p WHERE p.model_id = m.id)"
                " FROM model_versions m WHERE m.series_id = %s",
                series_id,
            )
        }
        for version in (int(k) for k in hot if k != "latest"):
            assert version in durable, f"{series_id} v{version} is in Redis only"
            assert durable[version][0] == durable[version][1]
        (last,) = pg_rows(s, "SELECT last_version FROM series WHERE series_id = %s", series_id)[0]
        assert hot.get("latest") in (None, str(last))
    report(
        "postgres stop",
        readings=plan.count,
        events=result.events,
        dead=result.dead,
        fits_during_load=Counter(answers),
        outage_fit_statuses=[a.status_code for a in outage_fits],
    )


@pytest.mark.slow
def test_postgres_stopped_under_a_running_worker_keeps_readings_pending_then_scores_them_once(
    fault_settings: Settings, fault_postgres: PostgresServer, rclient: redis.Redis, tmp_path: Path
) -> None:
    s = fault_settings  # the default delivery budget, claim time and retries
    api, base_url = start_api(s)
    try:
        (series_id,) = fit_series(base_url, 1)  # μ 100, σ 10: anomalous above 130
    finally:
        stop_process(api)
    worker = start_worker(s, "pg-down", tmp_path / "worker.log")
    try:
        wait_for(lambda: group_state(rclient, s)[0] == 0, "the worker's group")
        fault_postgres.stop()
        try:
            values = [100.0 + n for n in range(6)] + [200.0 + n for n in range(5)]
            ids = [
                str(rclient.xadd(s.stream_readings, reading_fields(series_id, START + n, v)))  # type: ignore[arg-type]
                for n, v in enumerate(values)
            ]
            time.sleep(10.0)
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
            # Valid readings are not poison: none dead, all still waiting for PostgreSQL.
            assert rclient.xlen(s.stream_dead) == 0, rclient.xrange(s.stream_dead)
            assert rclient.xlen(s.stream_anomalies) == 0
            # Acknowledging needs the outcome written: an anomaly's is its row in PostgreSQL,
            # so those stay pending (a normal reading has nothing to record there).
            pending = {
                str(p["message_id"])
                for p in rclient.xpending_range(s.stream_readings, s.stream_group, "-", "+", 100)
            }
            assert set(ids[6:]) <= pending <= set(ids), pending
        finally:
            fault_postgres.start()
        wait_for(lambda: group_state(rclient, s) == (0, ids[-1]), "the readings scored", 60)
        assert worker.poll() is None
    finally:
        stop_process(worker)
    sources = [f["source_id"] for _, f in rclient.xrange(s.stream_anomalies)]  # type: ignore[union-attr]
    assert sorted(sources) == sorted(ids[6:])  # the 5 anomalous ones, once each
    assert rclient.xlen(s.stream_dead) == 0
    stored = pg_rows(
        s, "SELECT source_id FROM anomalies WHERE source_stream = %s", s.stream_readings
    )
    assert sorted(r[0] for r in stored) == sorted(ids[6:])
