"""Our own processes killed and stopped: a worker killed with -9 twenty times, SIGTERM to a
worker mid-drain and to the API with requests in flight."""

from __future__ import annotations

import random
import signal
import threading
import time
import uuid
from pathlib import Path

import orjson
import pytest
import redis

from detector.settings import Settings
from embedded.servers import RedisServer
from tests.support.faults import (
    Feeder,
    Plan,
    account,
    fit_body,
    fit_series,
    group_state,
    pg_rows,
    raw_fit,
    report,
)
from tests.support.polling import wait_for
from tests.support.processes import start_worker, stop_process
from tests.support.services import start_api
from tests.support.streams import run_worker

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
        "SELECT m.version, (SELECT count(*) FROM training_point_rows p WHERE p.model_id = m.id)"
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
