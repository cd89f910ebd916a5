"""Helpers shared by the stream tests: per-test stream names, running a worker in-process."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import redis
from prometheus_client import CollectorRegistry

from detector.metrics import WorkerMetrics
from detector.settings import Settings
from detector.shards import shards
from detector.store.connections import postgres_pool, redis_client
from detector.transports.redis.worker import Worker
from ingest.publisher import Publisher


def stream_settings(settings: Settings, **overrides: Any) -> Settings:
    """The session settings with streams of this test's own (tests never share a stream)."""
    tag = uuid.uuid4().hex[:10]
    values: dict[str, Any] = {
        "stream_readings": f"readings-{tag}",
        "stream_anomalies": f"anomalies-{tag}",
        "stream_dead": f"readings-{tag}:dead",
        "metrics_port": 0,
        "stream_block_ms": 200,
        **overrides,
    }
    return settings.model_copy(update=values)


async def run_worker_async(
    settings: Settings, *, consumer: str = "test-worker", burst: bool = True
) -> tuple[Worker, WorkerMetrics]:
    metrics = WorkerMetrics(CollectorRegistry())
    client = redis_client(settings)
    pool = postgres_pool(settings)
    await pool.open()
    try:
        worker = Worker(settings, client, pool, metrics=metrics, consumer=consumer)
        await worker.run(burst=burst)
    finally:
        await pool.close()
        await client.aclose()
    return worker, metrics


def run_worker(settings: Settings, **kwargs: Any) -> tuple[Worker, WorkerMetrics]:
    return asyncio.run(run_worker_async(settings, **kwargs))


def sample(metrics: WorkerMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def fit(client: httpx.Client, series_id: str, values: list[float]) -> str:
    """Fit over REST (as users do); returns the version name."""
    answer = client.post(
        f"/fit/{series_id}", json={"timestamps": list(range(len(values))), "values": values}
    )
    assert answer.status_code == 200, answer.text
    return str(answer.json()["version"])


def fit_seasonal(client: httpx.Client, series_id: str) -> list[tuple[int, float]]:
    """Fit the seasonal kind over REST on 600 readings 300 s apart (a weekly profile's two
    days, values 100–106); returns the next 100 readings of the same pattern, none of them
    anomalous, for a test to stream."""
    answer = client.post(
        f"/fit/{series_id}",
        json={
            "timestamps": [300 * i for i in range(600)],
            "values": [100.0 + (i % 7) for i in range(600)],
            "kind": "seasonal",
        },
    )
    assert answer.status_code == 200, answer.text
    return [(300 * i, 100.0 + (i % 7)) for i in range(600, 700)]


def publish(
    client: redis.Redis, stream: str, rows: list[tuple[str, int, float]], batch: int = 1000
) -> list[str]:
    """Publish (series, timestamp, value) rows; returns their entry ids in order."""
    publisher = Publisher(client, stream=stream, batch_size=10**9)
    ids: list[str] = []
    for start in range(0, len(rows), batch):
        for series_id, timestamp, value in rows[start : start + batch]:
            publisher.publish(series_id, timestamp, value)
        ids += publisher.flush()
    return ids


def events(client: redis.Redis, stream: str) -> list[tuple[str, dict[str, str]]]:
    return [(str(i), f) for i, f in client.xrange(stream)]  # type: ignore[union-attr]


def shards_drained(client: redis.Redis, s: Settings) -> bool:
    """Every shard's group has been given its stream's newest entry and has nothing pending
    (the workers trim what they acknowledged, so the streams' lengths tell nothing)."""
    for shard in shards(s):
        try:
            (group,) = client.xinfo_groups(shard.readings)  # type: ignore[misc]
            newest = client.xinfo_stream(shard.readings)["last-generated-id"]  # type: ignore[index]
        except (redis.exceptions.RedisError, ValueError):
            return False
        if group["pending"] or group["last-delivered-id"] != newest:
            return False
    return True


def shard_events(client: redis.Redis, s: Settings) -> dict[int, list[dict[str, str]]]:
    """Each shard's anomalies stream, by shard index."""
    return {
        sh.index: [f for _, f in client.xrange(sh.anomalies)]  # type: ignore[union-attr]
        for sh in shards(s)
    }
