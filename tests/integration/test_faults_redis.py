"""Redis faults against real processes: killed with -9 and restarted, flushed under load, out
of memory, turned into a read-only replica. The API answers 503 naming Redis, never a 500, and
the worker waits and resumes without a restart, losing and repeating nothing."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
import redis

from detector.settings import Settings
from detector.wire.readings import reading_fields
from embedded.credentials import Credentials
from embedded.processes import free_port
from embedded.servers import PostgresServer, RedisServer
from tests.support.faults import (
    START,
    TRAINING,
    Feeder,
    Plan,
    PredictLoop,
    account,
    drained,
    fit_series,
    group_state,
    refusing_redis_phase,
    report,
    resumed,
)
from tests.support.polling import wait_for
from tests.support.processes import start_worker, stop_process, wait_consuming
from tests.support.services import start_api
from tests.support.streams import stream_settings

# ---------------------------------------------------------------- Redis


@pytest.mark.slow
def test_redis_kill_9_and_restart_under_live_api_and_worker(
    fault_settings: Settings, fault_redis: RedisServer, rclient: redis.Redis, tmp_path: Path
) -> None:
    s = fault_settings
    api, base_url = start_api(s)
    worker = start_worker(s, "survivor", tmp_path / "worker.log")
    try:
        wait_consuming(s, "survivor", worker)
        series = fit_series(base_url)
        plan = Plan(series, 20_000)
        feeder = Feeder(s.redis_connection_url(), s.stream_readings, plan, chunk=200, pause=0.01)
        predicts = PredictLoop(
            base_url, series[0], 150.0, {"anomaly": True, "model_version": "v1.0.0"}
        )
        feeder.start()
        predicts.start()
        wait_for(lambda: rclient.xlen(s.stream_anomalies) > 0, "the first events")
        wait_for(lambda: feeder.sent >= plan.count // 3, "a third of the readings")
        sent_at_kill = feeder.sent
        fault_redis.stop(kill=True)  # SIGKILL: what it acknowledged is in its AOF
        time.sleep(1.0)
        fault_redis.start()  # same port, same data directory
        restarted_at = sum(predicts.statuses.values())
        feeder.finish()
        wait_for(lambda: drained(rclient, s, plan), "the worker to drain the stream", 90)
        # Predictions resume without restarting the API, with the right answer.
        wait_for(lambda: sum(predicts.statuses.values()) > restarted_at + 20, "predictions")
        statuses = predicts.finish()
        assert worker.poll() is None, "the worker died"
    finally:
        stop_process(api)
        stop_process(worker)
    assert sent_at_kill < plan.count, "Redis was killed after everything was published"
    assert predicts.wrong == []
    # PostgreSQL stayed up, so predictions never fail (they fall back to it): 0 5xx.
    assert set(statuses) == {200}, statuses
    result = account(rclient, s, plan)
    log = (tmp_path / "worker.log").read_text()
    assert "Traceback" not in log, log
    report(
        "redis kill -9",
        readings=plan.count,
        events=result.events,
        dead=result.dead,
        acknowledged_without_output=result.acknowledged_without_output,
        duplicates=result.duplicates,
        feeder_retries=feeder.retries,
        predicts=dict(statuses),
    )


@pytest.mark.slow
def test_redis_flushall_under_load_reloads_models_and_recreates_the_group(
    fault_settings: Settings, fault_redis: RedisServer, rclient: redis.Redis, tmp_path: Path
) -> None:
    s = fault_settings
    api, base_url = start_api(s)
    worker = start_worker(s, "flushed", tmp_path / "worker.log")
    try:
        wait_consuming(s, "flushed", worker)
        fit_series(base_url)  # other series in Redis, for the flush to wipe too
        (series_id,) = fit_series(base_url, 1, sigma=3.0)  # v1: bound 130
        with httpx.Client(base_url=base_url, timeout=60) as http:
            body = {"timestamps": list(range(10)), "values": TRAINING, "sigma": 1.0}
            assert http.post(f"/fit/{series_id}", json=body).status_code == 200  # v2: 110
        plan = Plan([series_id], 6000, sigma=1.0)  # anomalous under v2 only (115)
        feeder = Feeder(s.redis_connection_url(), s.stream_readings, plan, chunk=100, pause=0.01)
        predicts = PredictLoop(
            base_url, series_id, 120.0, {"anomaly": True, "model_version": "v2.0.0"}
        )
        feeder.start()
        predicts.start()
        wait_for(lambda: rclient.xlen(s.stream_anomalies) > 0, "the first events")
        with feeder.lock:  # between two chunks: what is published from now on survives
            rclient.flushall()
            flushed_at = feeder.sent
        feeder.finish()
        wait_for(lambda: drained(rclient, s, plan), "the worker to drain the stream", 60)
        statuses = predicts.finish()
        assert worker.poll() is None, "the worker died"
        model = rclient.hgetall(f"model:{{{series_id}}}")
    finally:
        stop_process(api)
        stop_process(worker)
    assert 0 < flushed_at < plan.count
    # Models came back from PostgreSQL, with the latest pointer on v2.
    assert model["latest"] == "2" and "2" in model
    assert predicts.wrong == [] and set(statuses) == {200}, statuses
    # The group came back, with a warning saying why.
    log = (tmp_path / "worker.log").read_text()
    assert "consumer group vanished" in log, log
    assert "Traceback" not in log, log
    # Everything published after the flush is accounted for, scored by v2.
    after = set(range(flushed_at, plan.count))
    result = account(rclient, s, plan, only=after)
    versions = {f["model_version"] for _, f in rclient.xrange(s.stream_anomalies)}  # type: ignore[union-attr]
    assert versions == {"v2.0.0"}
    report(
        "redis flushall",
        published_after_flush=len(after),
        events=result.events,
        dead=result.dead,
        duplicates=result.duplicates,
        predicts=dict(statuses),
    )


def test_redis_out_of_memory_is_a_503_naming_redis_and_the_worker_waits(
    fault_settings: Settings, rclient: redis.Redis, tmp_path: Path
) -> None:
    s = fault_settings
    api, base_url = start_api(s)
    worker = start_worker(s, "oom", tmp_path / "worker.log")
    try:
        (series_id,) = fit_series(base_url, 1)
        wait_for(lambda: group_state(rclient, s)[0] == 0, "the worker's group")
        rclient.config_set("maxmemory-policy", "noeviction")
        # Below what is in use (an empty server uses about 1 MB): every write is refused.
        rclient.config_set("maxmemory", str(int(rclient.info("memory")["used_memory"]) // 2))
        try:
            refusing_redis_phase(base_url, worker, tmp_path / "worker.log", series_id, "OOM")
        finally:
            rclient.config_set("maxmemory", "0")
        resumed(rclient, s, base_url, series_id)
        assert worker.poll() is None
    finally:
        stop_process(api)
        stop_process(worker)
    assert "Traceback" not in (tmp_path / "worker.log").read_text()


def test_readings_in_flight_while_redis_is_out_of_memory_are_scored_once_afterwards(
    fault_settings: Settings, rclient: redis.Redis, tmp_path: Path
) -> None:
    s = fault_settings  # the default delivery budget and retries
    api, base_url = start_api(s)
    try:
        (series_id,) = fit_series(base_url, 1)
    finally:
        stop_process(api)
    worker = start_worker(s, "oom-in-flight", tmp_path / "worker.log")
    try:
        wait_for(lambda: group_state(rclient, s)[0] == 0, "the worker's group")
        values = [100.0 + n for n in range(6)] + [200.0 + n for n in range(5)]
        limit = str(int(rclient.info("memory")["used_memory"]) // 2)
        # The readings and the memory limit at once: the worker reads them, and every write
        # of their outcome (events, acknowledgements) is refused until the limit is lifted.
        pipe = rclient.pipeline(transaction=True)
        for n, value in enumerate(values):
            pipe.xadd(s.stream_readings, reading_fields(series_id, START + n, value))  # type: ignore[arg-type]
        pipe.config_set("maxmemory-policy", "noeviction")
        pipe.config_set("maxmemory", limit)
        ids = [str(i) for i in pipe.execute()[: len(values)]]
        try:
            time.sleep(10.0)
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
        finally:
            rclient.config_set("maxmemory", "0")
        wait_for(lambda: group_state(rclient, s) == (0, ids[-1]), "the readings scored", 60)
        assert worker.poll() is None
    finally:
        stop_process(worker)
    assert rclient.xrange(s.stream_dead) == []  # valid readings are never dead letters
    sources = [f["source_id"] for _, f in rclient.xrange(s.stream_anomalies)]  # type: ignore[union-attr]
    assert sorted(sources) == sorted(ids[6:])  # the 5 anomalous ones, once each


def test_redis_read_only_is_a_503_naming_redis_and_the_worker_waits(
    fault_postgres: PostgresServer, tmp_path: Path
) -> None:
    # Servers of this test's own: turning Redis into a replica replaces its data.
    # One set of passwords for both, so the replica can log in to its primary.
    credentials = Credentials.generate()
    replica = RedisServer(
        tmp_path / "replica", free_port(), appendonly=False, credentials=credentials
    ).start()
    primary = RedisServer(
        tmp_path / "primary", free_port(), appendonly=False, credentials=credentials
    ).start()
    client = redis.Redis.from_url(replica.admin_url(), decode_responses=True, socket_timeout=10)
    client.config_set("masteruser", "default")
    client.config_set("masterauth", credentials.redis_admin_password)
    s = stream_settings(
        Settings(**replica.settings_fields(), **fault_postgres.settings_fields()),
        stream_batch_count=100,
    )
    api, base_url = start_api(s)
    worker = start_worker(s, "replica", tmp_path / "worker.log")
    try:
        (series_id,) = fit_series(base_url, 1)
        wait_for(lambda: group_state(client, s)[0] == 0, "the worker's group")
        client.replicaof("127.0.0.1", primary.port)
        wait_for(lambda: client.info("replication")["master_link_status"] == "up", "the sync")
        try:
            refusing_redis_phase(base_url, worker, tmp_path / "worker.log", series_id, "READONLY")
        finally:
            client.replicaof("NO", "ONE")
        resumed(client, s, base_url, series_id)
        assert worker.poll() is None
    finally:
        stop_process(api)
        stop_process(worker)
        client.close()
        replica.stop()
        primary.stop()
    assert "Traceback" not in (tmp_path / "worker.log").read_text()
