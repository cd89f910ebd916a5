"""Late and out-of-order readings through the real worker: a stateful series' readings
shuffled within LATENESS_SECONDS give the events of the in-order stream; later ones are
flagged `late` and open no episode."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import httpx
import numpy as np
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from detector.metrics import WorkerMetrics
from detector.redis_keys import held_key
from detector.settings import Settings
from detector.store.connections import postgres_pool
from detector.store.connections import redis_client as async_redis_client
from detector.transports.redis.worker import Worker
from detector.wire.events import EVENT_FIELDS
from tests.support.streams import events, publish, run_worker_async, stream_settings

START = 1_700_000_000
STEP = 300  # the fit's cadence (5 minutes)
FIT_POINTS = 600
TOLERANCE = 3 * STEP
N = 80
SEED = 7  # every series of a test is fitted on the same noise: their states start equal


def noise(n: int, seed: int) -> list[float]:
    rng = np.random.default_rng(seed)
    return [round(float(x), 6) for x in 100.0 + rng.normal(0.0, 1.0, n)]


def fit_seasonal(client: httpx.Client) -> str:
    series_id = f"late-{uuid.uuid4().hex[:10]}"
    answer = client.post(
        f"/fit/{series_id}",
        json={
            "timestamps": [START + STEP * i for i in range(FIT_POINTS)],
            "values": noise(FIT_POINTS, SEED),
            "kind": "seasonal",
        },
    )
    assert answer.status_code == 200 and answer.json()["kind"] == "seasonal", answer.text
    return series_id


def stream_values(seed: int) -> list[float]:
    xs = noise(N, seed)
    xs[20:23] = [x + 40.0 for x in xs[20:23]]  # a spike: point alerts
    xs[50:] = [x + 12.0 for x in xs[50:]]  # a level shift: a shift alert
    return xs


def comparable(found: list[dict[str, str]]) -> dict[tuple[int, str], dict[str, Any]]:
    """Events by (series' place, timestamp) without ids and detection time; the episode by
    its opener's timestamp (ids follow arrival order)."""
    stamp = {f["source_id"]: f["timestamp"] for f in found}
    out = {}
    for f in found:
        rest = {k: v for k, v in f.items() if k not in ("source_id", "detected_at", "series_id")}
        rest["episode_id"] = stamp.get(f["episode_id"], "?")
        out[(f["series_id"], f["timestamp"])] = rest
    return out


@settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    seed=st.integers(0, 10**6),
    delays=st.lists(st.integers(0, TOLERANCE), min_size=N, max_size=N),
    batch=st.integers(3, 40),
)
def test_readings_shuffled_within_the_tolerance_give_the_in_order_events(
    settings: Settings,
    client: httpx.Client,
    redis_client: redis.Redis,
    seed: int,
    delays: list[int],
    batch: int,
) -> None:
    s = stream_settings(settings, stream_batch_count=batch, lateness_seconds=TOLERANCE)
    ordered, shuffled = fit_seasonal(client), fit_seasonal(client)
    xs = stream_values(seed)
    stamps = [START + STEP * (FIT_POINTS + i) for i in range(N)]
    # The last reading is far ahead: the watermark passes every other reading.
    stamps[-1] += 10 * TOLERANCE
    arrival = [*sorted(range(N - 1), key=lambda i: (stamps[i] + delays[i], i)), N - 1]
    rows = []
    for k, i in enumerate(arrival):  # the two series interleaved, one in order, one shuffled
        rows += [(ordered, stamps[k], xs[k]), (shuffled, stamps[i], xs[i])]
    publish(redis_client, s.stream_readings, rows)
    asyncio.run(run_worker_async(s))

    found = [f for _, f in events(redis_client, s.stream_anomalies)]
    assert all(list(f)[: len(EVENT_FIELDS)] == list(EVENT_FIELDS) for f in found)
    want = comparable([f for f in found if f["series_id"] == ordered])
    got = comparable([f for f in found if f["series_id"] == shuffled])
    assert want, "the example raised no event"
    assert {k[1]: v for k, v in got.items()} == {k[1]: v for k, v in want.items()}
    assert not any("late" in f for f in found)
    # Each event written once, though the held ones were written with later readings.
    assert len({f["source_id"] for f in found}) == len(found)


def test_a_reading_later_than_the_tolerance_is_flagged_late_and_opens_no_episode(
    settings: Settings, client: httpx.Client, redis_client: redis.Redis
) -> None:
    s = stream_settings(settings, stream_batch_count=10, lateness_seconds=TOLERANCE)
    series_id = fit_seasonal(client)
    xs = noise(N, 11)
    stamps = [START + STEP * (FIT_POINTS + i) for i in range(N)]
    late_at = stamps[N // 2]  # half the stream behind the newest reading, and a spike
    rows = [(series_id, t, x) for t, x in zip(stamps, xs, strict=True)]
    rows.append((series_id, late_at + 1, 160.0))
    ids = publish(redis_client, s.stream_readings, rows)
    asyncio.run(run_worker_async(s))

    found = {f["source_id"]: f for _, f in events(redis_client, s.stream_anomalies)}
    late = found[ids[-1]]
    assert late["late"] == "1" and late["onset"] == "0"
    assert list(late)[-1] == "late"  # a new field after every existing one
    assert float(late["detector_score"]) > 1.0
    assert all("late" not in f for i, f in found.items() if i != ids[-1])
    assert all(f["onset"] == "0" or f["source_id"] != ids[-1] for f in found.values())


def in_order_and_shuffled(
    client: httpx.Client, seed: int, tolerance: int
) -> tuple[str, str, list[tuple[str, int, float]]]:
    """Two series fitted alike; rows of one in order, of the other shuffled within
    ``tolerance`` (each reading delayed by a pseudo-random part of it), interleaved."""
    ordered, shuffled = fit_seasonal(client), fit_seasonal(client)
    xs = stream_values(seed)
    stamps = [START + STEP * (FIT_POINTS + i) for i in range(N)]
    stamps[-1] += 10 * tolerance
    delays = np.random.default_rng(seed).integers(0, tolerance + 1, N)
    arrival = [*sorted(range(N - 1), key=lambda i: (stamps[i] + delays[i], i)), N - 1]
    rows = []
    for k, i in enumerate(arrival):
        rows += [(ordered, stamps[k], xs[k]), (shuffled, stamps[i], xs[i])]
    return ordered, shuffled, rows


def test_two_workers_on_a_shuffled_stream_give_the_in_order_events(
    settings: Settings, client: httpx.Client, redis_client: redis.Redis
) -> None:
    tolerance = 10 * STEP  # covers the readings' own disorder and two workers' interleaving
    s = stream_settings(settings, stream_batch_count=4, lateness_seconds=tolerance)
    ordered, shuffled, rows = in_order_and_shuffled(client, 3, 3 * STEP)
    publish(redis_client, s.stream_readings, rows[:-2])

    async def both() -> None:
        await asyncio.gather(run_worker_async(s, consumer="a"), run_worker_async(s, consumer="b"))

    asyncio.run(both())
    # The readings far ahead, which release the held ones, come once both are done (had a
    # worker taken them before the other's batch, that batch would be late).
    publish(redis_client, s.stream_readings, rows[-2:])
    asyncio.run(run_worker_async(s))
    found = [f for _, f in events(redis_client, s.stream_anomalies)]
    want = comparable([f for f in found if f["series_id"] == ordered])
    got = comparable([f for f in found if f["series_id"] == shuffled])
    assert want and {k[1]: v for k, v in got.items()} == {k[1]: v for k, v in want.items()}
    assert len({f["source_id"] for f in found}) == len(found)


def test_a_redelivered_batch_writes_the_held_readings_it_released_once(
    settings: Settings, client: httpx.Client, redis_client: redis.Redis
) -> None:
    s = stream_settings(settings, stream_batch_count=1000, lateness_seconds=TOLERANCE)
    series_id = fit_seasonal(client)
    stamps = [START + STEP * (FIT_POINTS + i) for i in range(12)]
    values = noise(12, 4)
    values[9] += 40.0  # a spike among the readings the first batch holds
    publish(redis_client, s.stream_readings, [(series_id, stamps[i], values[i]) for i in range(11)])
    asyncio.run(run_worker_async(s))
    assert events(redis_client, s.stream_anomalies) == []  # the spike is held
    carrier = publish(redis_client, s.stream_readings, [(series_id, stamps[11] + 10**4, 100.0)])

    async def crash_after_folding() -> list[dict[str, str]]:
        """Score and fold the carrier's batch, then 'crash' before committing it."""
        client_ = async_redis_client(s)
        pool = postgres_pool(s)
        await pool.open()
        try:
            worker = Worker(
                s, client_, pool, metrics=WorkerMetrics(CollectorRegistry()), consumer="w"
            )
            await worker.ops.ensure_group()
            outcome = await worker.pipeline.run(await worker.ops.read("w", ">", 1000))
            assert set(outcome.carriers.values()) == set(carrier)
            return list(outcome.events.values())
        finally:
            await pool.close()
            await client_.aclose()

    first = asyncio.run(crash_after_folding())
    assert [int(f["timestamp"]) for f in first] == [stamps[9]]
    assert events(redis_client, s.stream_anomalies) == []
    asyncio.run(run_worker_async(s, consumer="w"))  # restarts: re-reads its pending entry
    got = [f for _, f in events(redis_client, s.stream_anomalies)]

    def key(f: dict[str, str]) -> tuple[str, ...]:
        return tuple(f[k] for k in ("source_id", "timestamp", "score", "episode_id", "onset"))

    assert [key(f) for f in got] == [key(f) for f in first]  # written once, the same
    assert redis_client.xpending(s.stream_readings, s.stream_group)["pending"] == 0


def test_the_held_readings_of_a_series_that_stops_are_flushed_by_the_sweep(
    settings: Settings, client: httpx.Client, redis_client: redis.Redis
) -> None:
    tolerance = 2  # event seconds; the flush comes this much wall time after the last reading
    s = stream_settings(
        settings, lateness_seconds=tolerance, lateness_flush_seconds=0.0, silence_sweep_seconds=0.1
    )
    series_id = fit_seasonal(client)
    stamps = [START + STEP * (FIT_POINTS + i) for i in range(10)]
    stamps[-1] = stamps[-2] + 1  # the last two readings within the tolerance of the newest
    values = noise(10, 8)
    values[-2] += 40.0  # a spike, held when the stream stops
    ids = publish(redis_client, s.stream_readings, list(zip([series_id] * 10, stamps, values)))
    asyncio.run(run_worker_async(s))
    assert events(redis_client, s.stream_anomalies) == []
    assert redis_client.zscore(held_key(), series_id) is not None

    time.sleep(tolerance + 0.5)
    asyncio.run(run_worker_async(s))  # its first sweep finds the series due
    found = [f for _, f in events(redis_client, s.stream_anomalies)]
    assert [f["source_id"] for f in found] == [ids[-2]] and found[0]["onset"] == "1"
    assert redis_client.zscore(held_key(), series_id) is None
    asyncio.run(run_worker_async(s))  # nothing is flushed twice
    assert len(events(redis_client, s.stream_anomalies)) == 1
