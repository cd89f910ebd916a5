"""Fault injection against real processes: Redis killed and flushed, PostgreSQL stopped,
workers killed with -9, SIGTERM to the API and the worker. Each fault hits servers of this
module's own, so the session's Redis and PostgreSQL (used by every other test) never notice.

Accounting: every reading is published with a known fate (anomalous, normal, a series
without a model, or poison), so each is accounted for by its entry id: anomalous → exactly one
event with that `source_id`; poison → exactly one dead letter; the rest → acknowledged (the
group has delivered every entry and nothing is pending). The numbers measured are printed
(`pytest -s`) and quoted in docs/operations.md ("Tested failure behaviour").
"""

from __future__ import annotations

import random
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import psycopg
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from detector.settings import Settings
from detector.store.connections import apply_schema_sync
from detector.wire.readings import reading_fields
from embedded.processes import free_port
from embedded.servers import PostgresServer, RedisServer
from tests.support.polling import REDIS_CONNECTION_ERRORS, wait_for
from tests.support.processes import start_worker, stop_process
from tests.support.services import postgres_data_dir, start_api
from tests.support.streams import run_worker, stream_settings

START = 1_700_000_000
BASE_MS = 1_700_000_000_000
SERIES_COUNT = 4
TRAINING = [90.0, 110.0] * 5  # μ 100, σ exactly 10 (scaled per series below)

# ---------------------------------------------------------------- servers of our own


@pytest.fixture(scope="module")
def fault_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("fault-redis"), free_port(), appendonly=True)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def fault_postgres() -> Iterator[PostgresServer]:
    # Durable settings (fsync, synchronous commit): these tests stop the server under load
    # and check what survived, which a throwaway cluster's asynchronous commits could lose.
    data_dir = postgres_data_dir()
    server = PostgresServer(data_dir, free_port(), durable=True)
    server.start()
    apply_schema_sync(server.conninfo())
    yield server
    server.stop()
    shutil.rmtree(data_dir.parent, ignore_errors=True)


@pytest.fixture
def fault_settings(fault_redis: RedisServer, fault_postgres: PostgresServer) -> Settings:
    """This module's servers, and streams of this test's own."""
    base = Settings(**fault_redis.settings_fields(), **fault_postgres.settings_fields())
    return stream_settings(base, stream_batch_count=100)


@pytest.fixture
def rclient(fault_redis: RedisServer) -> Iterator[redis.Redis]:
    # The admin user: these tests FLUSHALL and DEBUG SLEEP, which the services may not.
    client = redis.Redis.from_url(fault_redis.admin_url(), decode_responses=True, socket_timeout=10)
    yield client
    client.close()


def pg_rows(settings: Settings, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(settings.postgres_conninfo(), autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()  # type: ignore[arg-type]


# ---------------------------------------------------------------- readings with known fates


@dataclass
class Plan:
    """N readings and their fates, with explicit entry ids (so a retried XADD is idempotent)."""

    series: list[str]
    count: int
    sigma: float = 3.0
    ids: list[str] = field(init=False)
    rows: list[dict[str, str]] = field(init=False)
    anomalous: set[int] = field(init=False, default_factory=set)
    dead: set[int] = field(init=False, default_factory=set)
    no_model: set[int] = field(init=False, default_factory=set)

    def __post_init__(self) -> None:
        self.ids = [f"{BASE_MS}-{n + 1}" for n in range(self.count)]
        self.rows = []
        unknown = f"nomodel-{uuid.uuid4().hex[:8]}"
        for n in range(self.count):
            i = n % len(self.series)
            center = 100.0 * (i + 1)
            # Normal readings stay within ±0.9 kσ of μ (σ is 10).
            series_id, value = self.series[i], center + ((n * 7) % 41 - 20) * 0.45 * self.sigma
            if n % 50 == 49:
                value_text = "not-a-number"  # poison: dead letter `bad_value`
                self.dead.add(n)
            else:
                if n % 10 == 3:
                    value = center + 10.0 * self.sigma + 5.0  # above μ + kσ
                    self.anomalous.add(n)
                elif n % 25 == 7:
                    series_id = unknown  # valid, but no model: acknowledged, no event
                    self.no_model.add(n)
                value_text = repr(value)
            self.rows.append(
                {"series_id": series_id, "timestamp": str(START + n), "value": value_text}
            )

    def index(self) -> dict[str, int]:
        return {entry_id: n for n, entry_id in enumerate(self.ids)}


def fit_series(base_url: str, count: int = SERIES_COUNT, *, sigma: float = 3.0) -> list[str]:
    """Fits series i (over REST, as users do) with μ = 100 (i + 1) and σ = 10."""
    series = [f"f-{uuid.uuid4().hex[:10]}" for _ in range(count)]
    with httpx.Client(base_url=base_url, timeout=60) as http:
        for i, series_id in enumerate(series):
            values = [v + 100.0 * i for v in TRAINING]
            body = {"timestamps": list(range(len(values))), "values": values, "sigma": sigma}
            answer = http.post(f"/fit/{series_id}", json=body)
            assert answer.status_code == 200, answer.text
    return series


class Feeder(threading.Thread):
    """Publishes a plan's readings in pipelined chunks, retrying through Redis outages.

    Ids are explicit and increasing: when a chunk is retried after a connection error, the
    entries Redis already had are refused ("equal or smaller than the top item") rather than
    added twice, so every reading is in the stream exactly once. ``lock`` is held while a
    chunk is in flight (a test takes it to fault Redis between chunks)."""

    def __init__(self, url: str, stream: str, plan: Plan, *, chunk: int = 200, pause: float = 0):
        super().__init__(daemon=True)
        self.client = redis.Redis.from_url(
            url,
            decode_responses=True,
            socket_timeout=5,
            socket_connect_timeout=1,
            retry=Retry(NoBackoff(), 0),  # we retry ourselves, idempotently
        )
        self.stream, self.plan, self.chunk, self.pause = stream, plan, chunk, pause
        self.lock = threading.Lock()
        self.sent = 0
        self.retries = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while self.sent < self.plan.count:
                end = min(self.sent + self.chunk, self.plan.count)
                with self.lock:
                    try:
                        self._publish(self.sent, end)
                    except REDIS_CONNECTION_ERRORS:
                        self.retries += 1
                        time.sleep(0.05)
                        continue
                    self.sent = end
                if self.pause:
                    time.sleep(self.pause)
        except BaseException as exc:
            self.error = exc
        finally:
            self.client.close()

    def _publish(self, start: int, end: int) -> None:
        pipe = self.client.pipeline(transaction=False)
        for n in range(start, end):
            pipe.xadd(self.stream, self.plan.rows[n], id=self.plan.ids[n])  # type: ignore[arg-type]
        for result in pipe.execute(raise_on_error=False):
            if isinstance(result, Exception) and "equal or smaller" not in str(result):
                raise result

    def finish(self, timeout: float = 120) -> None:
        self.join(timeout)
        assert not self.is_alive(), "the feeder did not finish"
        if self.error is not None:
            raise self.error


class PredictLoop(threading.Thread):
    """Asks /predict over and over; every answer is kept by status, wrong 200s are kept too."""

    def __init__(self, base_url: str, series_id: str, value: float, expected: dict[str, Any]):
        super().__init__(daemon=True)
        self.base_url, self.series_id, self.value, self.expected = (
            base_url,
            series_id,
            value,
            expected,
        )
        self.statuses: Counter[int] = Counter()
        self.wrong: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        with httpx.Client(base_url=self.base_url, timeout=60) as http:
            while not self.stop.is_set():
                answer = http.post(
                    f"/predict/{self.series_id}", json={"timestamp": START, "value": self.value}
                )
                self.statuses[answer.status_code] += 1
                if answer.status_code == 200 and answer.json() != self.expected:
                    self.wrong.append(answer.text)
                time.sleep(0.005)

    def finish(self) -> Counter[int]:
        self.stop.set()
        self.join(60)
        return self.statuses


def group_state(client: redis.Redis, s: Settings) -> tuple[int, str]:
    """(pending entries, last-delivered id) of the detector group; (-1, "") if none."""
    if not client.exists(s.stream_readings):
        return -1, ""
    for group in client.xinfo_groups(s.stream_readings):  # type: ignore[union-attr]
        if group["name"] == s.stream_group:
            return int(group["pending"]), str(group["last-delivered-id"])
    return -1, ""


def drained(client: redis.Redis, s: Settings, plan: Plan) -> bool:
    return group_state(client, s) == (0, plan.ids[-1])


@dataclass
class Accounting:
    sent: int
    events: int
    dead: int
    acknowledged_without_output: int
    duplicates: int


def account(
    client: redis.Redis, s: Settings, plan: Plan, *, only: set[int] | None = None
) -> Accounting:
    """Checks every reading of ``plan`` (or those in ``only``) is accounted for, exactly once."""
    wanted = set(range(plan.count)) if only is None else only
    events = Counter(f["source_id"] for _, f in client.xrange(s.stream_anomalies))  # type: ignore[union-attr]
    dead = Counter(f["source_id"] for _, f in client.xrange(s.stream_dead))  # type: ignore[union-attr]
    duplicates = sum(n - 1 for n in events.values()) + sum(n - 1 for n in dead.values())
    assert duplicates == 0, "a reading gave two outputs"
    assert set(events) == {plan.ids[n] for n in plan.anomalous & wanted}, "an event was lost"
    assert set(dead) == {plan.ids[n] for n in plan.dead & wanted}, "a dead letter was lost"
    pending, last = group_state(client, s)
    assert (pending, last) == (0, plan.ids[-1]), "a reading was never acknowledged"
    # The durable copy: PostgreSQL holds each event once too (unique on stream and source id).
    stored = pg_rows(
        s, "SELECT source_id FROM anomalies WHERE source_stream = %s", s.stream_readings
    )
    wanted_ids = {plan.ids[n] for n in wanted}
    assert Counter(r[0] for r in stored if r[0] in wanted_ids) == Counter(set(events))
    return Accounting(
        sent=len(wanted),
        events=len(events),
        dead=len(dead),
        acknowledged_without_output=len(wanted) - len(events) - len(dead),
        duplicates=duplicates,
    )


def report(name: str, **numbers: Any) -> None:
    print(f"\n[faults] {name}: " + ", ".join(f"{k}={v}" for k, v in numbers.items()))


# ---------------------------------------------------------------- Redis


@pytest.mark.slow
def test_redis_kill_9_and_restart_under_live_api_and_worker(
    fault_settings: Settings, fault_redis: RedisServer, rclient: redis.Redis, tmp_path: Path
) -> None:
    s = fault_settings
    api, base_url = start_api(s)
    worker = start_worker(s, "survivor", tmp_path / "worker.log")
    try:
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


# ---------------------------------------------------------------- PostgreSQL


def fit_body(points: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    return {
        "timestamps": list(range(points)),
        "values": [rng.gauss(50.0, 5.0) for _ in range(points)],
    }


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
        feeder = Feeder(s.redis_port, s.stream_readings, plan, chunk=20, pause=0.05)
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
                " (SELECT count(*) FROM training_points p WHERE p.model_id = m.id)"
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


# ---------------------------------------------------------------- workers


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_worker_killed_20_times_during_100k_readings(
    fault_settings: Settings, fault_redis: RedisServer, rclient: redis.Redis, tmp_path: Path
) -> None:
    # Claims come sooner than the default 30 s so the run stays short; the delivery budget is
    # the default (5): a reading whose worker was killed is not poison, and must still reach
    # its real outcome.
    s = fault_settings.model_copy(
        update={"stream_claim_idle_ms": 300, "stream_claim_interval_ms": 100}
    )
    api, base_url = start_api(s)
    try:
        series = fit_series(base_url)
    finally:
        stop_process(api)
    plan = Plan(series, 100_000)
    feeder = Feeder(s.redis_connection_url(), s.stream_readings, plan, chunk=5000)
    feeder.run()
    assert feeder.error is None
    index = plan.index()
    rng = random.Random(20)
    kills = 20
    targets = sorted(rng.sample(range(2000, plan.count - 5000), kills))
    killed_at: list[int] = []
    batches_cut = 0  # kills that left entries delivered but not acknowledged
    for k, target in enumerate(targets):
        # Mostly the same consumer name (a restarted worker re-reads its own pending entries),
        # sometimes a new one (it claims the dead one's entries with XAUTOCLAIM).
        consumer = "victim" if k % 4 else f"victim-{k}"
        proc = start_worker(s, consumer, tmp_path / "workers.log")
        try:

            def progressed(target: int = target) -> bool:
                assert proc.poll() is None, (tmp_path / "workers.log").read_text()[-3000:]
                return index.get(group_state(rclient, s)[1], -1) >= target

            wait_for(progressed, f"the worker to pass reading {target}", 60)
            time.sleep(rng.uniform(0, 0.02))
        finally:
            proc.kill()
            proc.wait()
        pending, last = group_state(rclient, s)
        killed_at.append(index.get(last, -1))
        batches_cut += pending > 0
    assert killed_at[-1] < plan.count - 1, "the stream was drained before the last kill"
    pending_after_kills = group_state(rclient, s)[0]
    run_worker(s, consumer="rescuer")  # claims every dead consumer's entries, then drains
    result = account(rclient, s, plan)
    assert "Traceback" not in (tmp_path / "workers.log").read_text()
    report(
        "worker kill -9",
        kills=kills,
        readings=plan.count,
        events=result.events,
        dead=result.dead,
        acknowledged_without_output=result.acknowledged_without_output,
        duplicates=result.duplicates,
        pending_after_kills=pending_after_kills,
        kills_leaving_entries_pending=batches_cut,
    )


@pytest.mark.slow
def test_worker_sigterm_mid_drain_then_restart_loses_and_repeats_nothing(
    fault_settings: Settings, fault_redis: RedisServer, rclient: redis.Redis, tmp_path: Path
) -> None:
    s = fault_settings
    api, base_url = start_api(s)
    try:
        series = fit_series(base_url)
    finally:
        stop_process(api)
    plan = Plan(series, 20_000)
    feeder = Feeder(s.redis_connection_url(), s.stream_readings, plan, chunk=5000)
    feeder.run()
    index = plan.index()
    worker = start_worker(s, "polite", tmp_path / "worker.log")
    try:
        wait_for(lambda: index.get(group_state(rclient, s)[1], -1) >= 3000, "the worker to start")
    finally:
        code = stop_process(worker, signal.SIGTERM)
    assert code == 0
    pending, last = group_state(rclient, s)
    assert pending == 0, "the batch in hand was not finished"
    assert index[last] < plan.count - 1, "SIGTERM came after the stream was drained"
    worker = start_worker(s, "polite", tmp_path / "worker.log", "--burst")
    assert worker.wait(120) == 0
    result = account(rclient, s, plan)
    report(
        "worker sigterm",
        readings=plan.count,
        stopped_at=index[last] + 1,
        events=result.events,
        duplicates=result.duplicates,
    )


# ---------------------------------------------------------------- API


def raw_fit(port: int, series_id: str, body: bytes, sent: threading.Barrier) -> tuple[int, bytes]:
    """One fit over a plain socket: we know the request is in the server's hands once
    ``sendall`` returns (the body is far larger than the socket buffers)."""
    head = (
        f"POST /fit/{series_id} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        sock.sendall(head + body)
        sent.wait()
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    reply = b"".join(chunks)
    status = int(reply.split(b" ", 2)[1]) if reply else 0
    return status, reply.partition(b"\r\n\r\n")[2]


@pytest.mark.slow
def test_api_sigterm_completes_the_requests_in_flight(fault_settings: Settings) -> None:
    s = fault_settings
    api, base_url = start_api(s)
    port = int(base_url.rsplit(":", 1)[1])
    series_id = f"term-{uuid.uuid4().hex[:8]}"
    fits = 6
    points = 200_000
    body = orjson.dumps(fit_body(points, 1))
    sent = threading.Barrier(fits + 1)
    results: list[tuple[int, bytes]] = []
    finished: list[float] = []

    def one() -> None:
        results.append(raw_fit(port, series_id, body, sent))
        finished.append(time.monotonic())

    threads = [threading.Thread(target=one) for _ in range(fits)]
    try:
        for thread in threads:
            thread.start()
        sent.wait(60)  # every request is with the server
        api.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        for thread in threads:
            thread.join(120)
        # uvicorn shuts down gracefully, then re-raises the signal: it "dies" of SIGTERM.
        assert api.wait(60) in (0, -signal.SIGTERM)
    finally:
        stop_process(api)
    assert sorted(status for status, _ in results) == [200] * fits, results
    after_sigterm = sum(t > signalled for t in finished)
    assert after_sigterm > 0, "every fit was done before the SIGTERM"
    versions = sorted(orjson.loads(reply)["version"] for _, reply in results)
    assert versions == sorted(f"v{i}.0.0" for i in range(1, fits + 1))
    stored = pg_rows(
        s,
        "SELECT m.version, (SELECT count(*) FROM training_points p WHERE p.model_id = m.id)"
        " FROM model_versions m WHERE m.series_id = %s ORDER BY m.version",
        series_id,
    )
    assert stored == [(v, points) for v in range(1, fits + 1)]
    report(
        "api sigterm",
        fits=fits,
        points_each=points,
        answered_after_sigterm=after_sigterm,
        stored=len(stored),
    )


# ---------------------------------------------------------------- Redis refusing to serve


def refusing_redis_phase(
    base_url: str,
    worker: subprocess.Popen[bytes],
    log_path: Path,
    series_id: str,
    refused: str,
) -> None:
    """While Redis refuses writes: a fit is a 503 naming Redis, predictions of a stored model
    go on, and the worker waits (it neither exits nor writes a traceback)."""
    with httpx.Client(base_url=base_url, timeout=60) as http:
        answer = http.post(f"/fit/{series_id}", json=fit_body(100, 1))
        assert answer.status_code == 503, answer.text
        assert answer.json()["dependency"] == "redis", answer.text
        assert "Redis is unavailable" in answer.json()["detail"]
        assert refused in answer.json()["detail"], answer.text
    time.sleep(3.0)  # long enough for the worker's heartbeat, reads and retries to be refused
    assert worker.poll() is None, log_path.read_text()[-3000:]


def resumed(client: redis.Redis, s: Settings, base_url: str, series_id: str) -> None:
    """After Redis serves again: fits work, and the same worker scores new readings."""
    with httpx.Client(base_url=base_url, timeout=60) as http:
        answer = http.post(
            f"/fit/{series_id}", json={"timestamps": list(range(10)), "values": TRAINING}
        )
        assert answer.status_code == 200, answer.text
    plan = Plan([series_id], 20)
    plan.ids = [f"{int(time.time() * 1000)}-{n + 1}" for n in range(plan.count)]
    Feeder(client.connection_pool.connection_kwargs["port"], s.stream_readings, plan).run()
    wait_for(lambda: drained(client, s, plan), "the worker to resume", 60)
    events = [f["source_id"] for _, f in client.xrange(s.stream_anomalies)]  # type: ignore[union-attr]
    assert sorted(events) == sorted(plan.ids[n] for n in plan.anomalous)
    assert client.xlen(s.stream_dead) == len(plan.dead)


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
    replica = RedisServer(tmp_path / "replica", free_port(), appendonly=False).start()
    primary = RedisServer(tmp_path / "primary", free_port(), appendonly=False).start()
    client = redis.Redis(port=replica.port, decode_responses=True, socket_timeout=10)
    s = stream_settings(
        Settings(redis_port=replica.port, postgres_port=fault_postgres.port),
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
