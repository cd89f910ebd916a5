"""The stream worker against real Redis and PostgreSQL: events, faults, poison, refits."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
import sys
import time
import uuid

import pytest

from detector.redis_keys import heartbeat_key
from detector.settings import Settings
from detector.wire.events import EVENT_FIELDS
from tests.support.services import ROOT, service_env
from tests.support.streams import (
    events,
    fit,
    publish,
    run_worker,
    run_worker_async,
    sample,
    stream_settings,
)

START = 1_700_000_000


def training(center: float) -> list[float]:
    """Values whose μ is ``center`` and σ exactly 10: the bound μ + 3σ is center + 30."""
    return [center - 10.0, center + 10.0] * 5


def make_readings(
    series: list[str], count: int, seed: int = 4
) -> tuple[list[tuple[str, int, float]], set[int]]:
    """Readings of series i around 100 (i + 1); returns them and the indexes of anomalies."""
    rng = random.Random(seed)
    rows, anomalous = [], set()
    for n in range(count):
        i = n % len(series)
        center = 100.0 * (i + 1)
        draw = rng.random()
        if draw < 0.02:
            value = center + 30.0 + rng.uniform(0.001, 50.0)
            anomalous.add(n)
        elif draw < 0.03:
            value = center + 30.0  # exactly on the bound: not anomalous (strict rule)
        elif draw < 0.04:
            value = center - 60.0  # far below: not anomalous for direction "above"
        else:
            value = center + rng.uniform(-29.0, 29.0)
        rows.append((series[i], START + n, round(value, 6)))
    return rows, anomalous


def fit_series(client, count: int) -> list[str]:
    series = [f"w-{uuid.uuid4().hex[:10]}" for _ in range(count)]
    for i, series_id in enumerate(series):
        fit(client, series_id, training(100.0 * (i + 1)))
    return series


def test_ten_thousand_readings_give_exactly_the_expected_events(settings, client, redis_client, pg):
    s = stream_settings(settings)
    series = fit_series(client, 4)
    rows, anomalous = make_readings(series, 10_000)
    ids = publish(redis_client, s.stream_readings, rows)

    _, metrics = run_worker(s)

    got = events(redis_client, s.stream_anomalies)
    expected = [(ids[n], rows[n]) for n in sorted(anomalous)]
    assert [f["source_id"] for _, f in got] == [source for source, _ in expected]
    for (_, fields), (source_id, (series_id, ts, value)) in zip(got, expected, strict=True):
        center = 100.0 * (series.index(series_id) + 1)
        assert list(fields)[: len(EVENT_FIELDS)] == list(EVENT_FIELDS)
        assert fields["series_id"] == series_id
        assert fields["timestamp"] == str(ts)
        assert float(fields["value"]) == value
        assert fields["model_version"] == "v1.0.0"
        assert float(fields["mean"]) == center
        assert float(fields["std"]) == 10.0
        assert float(fields["lower"]) == center - 30.0
        assert float(fields["upper"]) == center + 30.0
        assert float(fields["score"]) == pytest.approx((value - center) / 10.0)
        assert abs(float(fields["detected_at"]) - time.time()) < 600
    # In order per series: timestamps increase within each series.
    for series_id in series:
        stamps = [int(f["timestamp"]) for _, f in got if f["series_id"] == series_id]
        assert stamps == sorted(stamps) and stamps

    assert sample(metrics, "stream_readings_total", transport="redis", outcome="scored") == 10_000
    assert sample(metrics, "stream_events_emitted_total", transport="redis") == len(anomalous)
    assert sample(metrics, "anomalies_detected_total", source="stream") == len(anomalous)
    assert sample(metrics, "stream_pending_entries", transport="redis") == 0
    assert sample(metrics, "stream_consumer_lag", transport="redis") == 0
    assert sample(metrics, "stream_batch_duration_seconds_count", transport="redis") > 0
    assert sample(metrics, "worker_last_batch_timestamp_seconds", transport="redis") > 0
    # Acknowledged readings are trimmed (XACK alone would keep them forever).
    assert redis_client.xlen(s.stream_readings) < 1000
    # And recorded durably, once each.
    stored = pg.execute(
        "SELECT source_id, series_id, ts FROM anomalies WHERE source_stream = %s ORDER BY ts",
        (s.stream_readings,),
    ).fetchall()
    assert [r[0] for r in stored] == [source for source, _ in expected]


def test_poison_entries_go_to_the_dead_letter_stream(settings, client, redis_client):
    s = stream_settings(settings)
    (series_id,) = fit_series(client, 1)
    poison = [
        ({"timestamp": "1", "value": "1"}, "missing_field"),
        ({"series_id": series_id, "value": "1"}, "missing_field"),
        ({"series_id": "bad id", "timestamp": "1", "value": "1"}, "bad_series_id"),
        ({"series_id": series_id, "timestamp": "1", "value": "abc"}, "bad_value"),
        ({"series_id": series_id, "timestamp": "1", "value": "nan"}, "bad_value"),
        ({"series_id": series_id, "timestamp": "1", "value": "inf"}, "bad_value"),
        ({"series_id": series_id, "timestamp": "-1", "value": "1"}, "bad_timestamp"),
        ({"series_id": series_id, "timestamp": "1.5", "value": "1"}, "bad_timestamp"),
        ({"series_id": series_id, "timestamp": "soon", "value": "1"}, "bad_timestamp"),
        ({"series_id": series_id, "timestamp": "1", "value": "1", "version": "vX"}, "bad_version"),
        ({"series_id": series_id, "timestamp": "1", "value": "1", "version": "0"}, "bad_version"),
        (
            {"series_id": series_id, "timestamp": "1", "value": "1", "version": "v9"},
            "unknown_version",
        ),
        (
            {"series_id": series_id, "timestamp": "1", "value": "1", "version": "v1.2.0"},
            "unknown_version",
        ),
        ({"series_id": series_id, "timestamp": "1", "value": "1", "reason": "x"}, None),
    ]
    ids = [redis_client.xadd(s.stream_readings, fields) for fields, _ in poison]
    good = redis_client.xadd(
        s.stream_readings, {"series_id": series_id, "timestamp": "2", "value": "500"}
    )

    _, metrics = run_worker(s)

    dead = events(redis_client, s.stream_dead)
    expected = [(i, f, r) for i, (f, r) in zip(ids, poison, strict=True) if r is not None]
    assert [(f["source_id"], f["reason"]) for _, f in dead] == [(i, r) for i, _, r in expected]
    for (_, letter), (_, fields, _) in zip(dead, expected, strict=True):
        assert letter["detail"]
        for name, value in fields.items():
            assert letter[name] == value  # the original fields travel with it
    assert [f["source_id"] for _, f in events(redis_client, s.stream_anomalies)] == [good]
    assert sample(metrics, "stream_readings_total", transport="redis", outcome="dead") == 13
    assert sample(metrics, "stream_dead_letters_total", transport="redis", reason="bad_value") == 3
    assert redis_client.xpending(s.stream_readings, s.stream_group)["pending"] == 0


def test_unknown_series_is_acknowledged_without_event(settings, redis_client):
    s = stream_settings(settings)
    unknown = f"nomodel-{uuid.uuid4().hex[:8]}"
    publish(redis_client, s.stream_readings, [(unknown, START + n, 1e6) for n in range(50)])

    _, metrics = run_worker(s)

    assert events(redis_client, s.stream_anomalies) == []
    assert events(redis_client, s.stream_dead) == []
    assert sample(metrics, "stream_readings_total", transport="redis", outcome="no_model") == 50
    assert redis_client.xpending(s.stream_readings, s.stream_group)["pending"] == 0


def test_refit_mid_stream_switches_the_events_version(settings, client, redis_client):
    s = stream_settings(settings, model_refresh_seconds=0.2)
    (series_id,) = fit_series(client, 1)  # μ 100, σ 10: bound 130

    async def scenario() -> None:
        publish(redis_client, s.stream_readings, [(series_id, START, 150.0)])
        await run_worker_async(s)
        fit(client, series_id, training(200.0))  # v2: μ 200, bound 230
        await asyncio.sleep(0.3)  # the worker's pointer cache is 0.2 s here (1 s by default)
        publish(redis_client, s.stream_readings, [(series_id, START + 1, 150.0)])
        publish(redis_client, s.stream_readings, [(series_id, START + 2, 250.0)])
        redis_client.xadd(
            s.stream_readings,
            {"series_id": series_id, "timestamp": START + 3, "value": 150, "version": "v1"},
        )
        await run_worker_async(s)

    asyncio.run(scenario())
    got = [f for _, f in events(redis_client, s.stream_anomalies)]
    assert [(f["timestamp"], f["model_version"], f["mean"]) for f in got] == [
        (str(START), "v1.0.0", "100.0"),
        (str(START + 2), "v2.0.0", "200.0"),
        (str(START + 3), "v1.0.0", "100.0"),  # a pinned version keeps its model
    ]


def test_two_workers_share_the_group_and_score_each_reading_once(settings, client, redis_client):
    s = stream_settings(settings, stream_batch_count=50)
    series = fit_series(client, 3)
    rows, anomalous = make_readings(series, 6000, seed=9)
    ids = publish(redis_client, s.stream_readings, rows)

    async def both() -> list:
        return await asyncio.gather(
            run_worker_async(s, consumer="one"), run_worker_async(s, consumer="two")
        )

    (w1, m1), (w2, m2) = asyncio.run(both())
    scored = [
        sample(m, "stream_readings_total", transport="redis", outcome="scored") for m in (m1, m2)
    ]
    assert sum(scored) == 6000 and min(scored) > 0  # both did a share
    assert w1.processed + w2.processed == 6000
    sources = [f["source_id"] for _, f in events(redis_client, s.stream_anomalies)]
    assert sorted(sources) == sorted(ids[n] for n in anomalous)
    assert len(set(sources)) == len(sources)


def _subprocess_env(s: Settings, **extra: str) -> dict[str, str]:
    return service_env(
        s,
        STREAM_READINGS=s.stream_readings,
        STREAM_ANOMALIES=s.stream_anomalies,
        STREAM_DEAD=s.stream_dead,
        STREAM_BATCH_COUNT="100",
        METRICS_PORT="0",
        **extra,
    )


@pytest.mark.slow
def test_kill_9_mid_stream_loses_nothing_and_duplicates_nothing(settings, client, redis_client):
    s = stream_settings(settings, stream_claim_idle_ms=500, stream_claim_interval_ms=100)
    series = fit_series(client, 4)
    rows, anomalous = make_readings(series, 40_000, seed=11)
    ids = publish(redis_client, s.stream_readings, rows, batch=5000)
    victim = subprocess.Popen(
        [sys.executable, "-m", "detector", "--consumer", "victim", "--log-level", "warning"],
        env=_subprocess_env(s),
        cwd=ROOT,
    )
    try:
        deadline = time.monotonic() + 60
        while redis_client.xlen(s.stream_anomalies) == 0:
            assert victim.poll() is None, "the worker died on its own"
            assert time.monotonic() < deadline, "the worker emitted nothing"
            time.sleep(0.005)
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
    finally:
        if victim.poll() is None:
            victim.kill()
    pending = redis_client.xpending(s.stream_readings, s.stream_group)["pending"]
    assert pending > 0 or redis_client.xlen(s.stream_anomalies) < len(anomalous)  # mid-stream

    run_worker(s, consumer="rescuer")

    sources = [f["source_id"] for _, f in events(redis_client, s.stream_anomalies)]
    assert len(sources) == len(set(sources)), "an event was written twice"
    assert sorted(sources) == sorted(ids[n] for n in anomalous), "an event was lost"
    group = redis_client.xinfo_groups(s.stream_readings)[0]
    assert group["pending"] == 0
    assert group["last-delivered-id"] == ids[-1]


def test_sigterm_finishes_the_batch_then_exits(settings, client, redis_client):
    s = stream_settings(settings)
    series = fit_series(client, 2)
    rows, _ = make_readings(series, 2000, seed=3)
    publish(redis_client, s.stream_readings, rows)
    worker = subprocess.Popen(
        [sys.executable, "-m", "detector", "--consumer", "polite", "--log-level", "warning"],
        env=_subprocess_env(s),
        cwd=ROOT,
    )
    heartbeat = heartbeat_key(s.stream_readings, "polite")

    def check(consumer: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "detector", "--check", "--consumer", consumer]
        env = _subprocess_env(s)
        return subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)

    try:
        deadline = time.monotonic() + 60
        while not redis_client.exists(heartbeat):
            assert time.monotonic() < deadline and worker.poll() is None
            time.sleep(0.01)
        assert 0 < redis_client.ttl(heartbeat) <= s.worker_heartbeat_ttl_seconds
        # The health record's reader: the live worker is found, a name nobody runs is not.
        alive = check("polite")
        assert alive.returncode == 0, alive.stdout + alive.stderr
        record = json.loads(alive.stdout.splitlines()[0])
        assert record["consumer"] == "polite" and record["pid"] == worker.pid
        assert check("nobody").returncode == 1
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
    assert redis_client.xpending(s.stream_readings, s.stream_group)["pending"] == 0
    assert not redis_client.exists(heartbeat)
    assert check("polite").returncode == 1  # a stopped worker clears its record


def test_the_group_is_recreated_when_it_vanishes(settings, client, redis_client):
    s = stream_settings(settings)
    (series_id,) = fit_series(client, 1)

    async def scenario() -> None:
        task = asyncio.create_task(run_worker_async(s, burst=False))
        while not redis_client.exists(s.stream_readings):  # noqa: ASYNC110 (polling Redis)
            await asyncio.sleep(0.01)
        redis_client.delete(s.stream_readings)  # as FLUSHALL would, for this stream only
        await asyncio.sleep(0.5)
        publish(redis_client, s.stream_readings, [(series_id, START, 500.0)])
        while redis_client.xlen(s.stream_anomalies) == 0:  # noqa: ASYNC110 (polling Redis)
            await asyncio.sleep(0.02)
        task.cancel()

    asyncio.run(asyncio.wait_for(scenario(), 30))
    assert len(events(redis_client, s.stream_anomalies)) == 1


@pytest.mark.slow
def test_redis_restart_mid_stream(settings, client, redis_client, redis_server):
    s = stream_settings(settings, stream_batch_count=20)
    series = fit_series(client, 2)
    rows, anomalous = make_readings(series, 20_000, seed=5)
    ids = publish(redis_client, s.stream_readings, rows, batch=5000)

    async def scenario() -> None:
        task = asyncio.create_task(run_worker_async(s, consumer="survivor"))
        while redis_client.xlen(s.stream_anomalies) == 0:  # noqa: ASYNC110 (polling Redis)
            await asyncio.sleep(0.005)
        stopped_at = redis_client.xinfo_groups(s.stream_readings)[0]["last-delivered-id"]
        try:
            await asyncio.to_thread(redis_server.stop)  # SIGTERM: the AOF is flushed
            await asyncio.sleep(0.5)
        finally:
            await asyncio.to_thread(redis_server.start)  # same port, same data
        await asyncio.wait_for(task, 60)
        assert stopped_at != ids[-1], "the restart came after the stream was drained"

    asyncio.run(scenario())
    sources = [f["source_id"] for _, f in events(redis_client, s.stream_anomalies)]
    assert len(sources) == len(set(sources))
    assert sorted(sources) == sorted(ids[n] for n in anomalous)
    assert redis_client.xpending(s.stream_readings, s.stream_group)["pending"] == 0
