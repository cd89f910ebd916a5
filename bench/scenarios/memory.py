"""The memory scenario: the API's resident memory with models cached, Redis bytes a model."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import redis

from bench.client import predict_requests, run_loadgen
from bench.context import Context
from bench.report import Row, reported
from detector.kinds.base import FitOptions
from detector.kinds.registry import MODEL_CLASSES, stateful_kind
from detector.kinds.training import prepare_training_data
from detector.redis_keys import model_key, state_key
from detector.settings import Settings
from detector.state.series import SeriesState
from detector.store.codec import ModelVersion

log = logging.getLogger("bench")


def rss_mb(pid: int) -> float:
    """Resident memory of process ``pid`` in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def scenario_memory(ctx: Context) -> list[Row]:
    rng = np.random.default_rng(5)
    r = redis.Redis.from_url(ctx.redis_url)
    models = int(r.eval("return #redis.call('KEYS', 'model:*')", 0))
    r.close()
    ids = [f"scale-{i:06d}" for i in range(min(models, 100_000))]
    paths, bodies = predict_requests(ids, rng)
    # Touch every model once so each sits in the API's in-process cache.
    run_loadgen(ctx, paths, bodies, connections=16, duration=3.0 if ctx.quick else 6.0)
    # A million series (issue: bytes a model and a state at that size); fewer when quick.
    n = 20_000 if ctx.quick else 1_000_000
    per_model = redis_bytes_per_model(ctx, n, rng)
    per_state = redis_bytes_per_state(ctx, n)
    return [
        reported("memory", "API RSS with the models cached", rss_mb(ctx.api_pid), "MiB"),
        Row(
            "memory",
            "Redis used memory per stored model",
            per_model,
            "bytes",
            None,
            f"used_memory delta storing {n:,} models",
            None,
            "≤ 300 bytes",
            per_model <= 300,
        ),
        Row(
            "memory",
            "Redis used memory per streaming state (default kind)",
            per_state,
            "bytes",
            None,
            f"used_memory delta storing {n:,} states",
            None,
            "≤ 1,024 bytes",
            per_state <= 1024,
        ),
    ]


def redis_bytes_per_model(ctx: Context, n: int, rng: np.random.Generator) -> float:
    """used_memory before and after storing ``n`` one-version series of the default kind
    exactly as the store does (its own ``to_redis`` form, the version field and the ``latest``
    pointer), then removed."""
    model_class = MODEL_CLASSES[str(Settings.model_fields["default_kind"].default)]
    means = rng.normal(50, 10, n)
    stds = np.abs(rng.normal(5, 1, n)) + 0.1
    created = datetime.now(UTC)
    r = redis.Redis.from_url(ctx.redis_url)
    try:
        before = int(r.info("memory")["used_memory"])
        keys = [model_key(f"mem-{i:07d}") for i in range(n)]
        for start in range(0, n, 10_000):
            with r.pipeline(transaction=False) as pipe:
                for i in range(start, min(n, start + 10_000)):
                    stored = ModelVersion(
                        f"mem-{i:07d}",
                        1,
                        model_class(mean=float(means[i]), std=float(stds[i])),
                        points_used=int(rng.integers(32, 100_000)),
                        created_at=created,
                    )
                    pipe.hset(keys[i], mapping={"1": stored.to_redis(), "latest": "1"})
                pipe.execute()
        after = int(r.info("memory")["used_memory"])
        encodings = {r.object("encoding", keys[0]), r.object("encoding", keys[-1])}
        log.info("Redis hash encoding of a stored model: %s", encodings)
        for start in range(0, n, 10_000):
            r.delete(*keys[start : start + 10_000])
    finally:
        r.close()
    return (after - before) / n


def redis_bytes_per_state(ctx: Context, n: int) -> float:
    """used_memory before and after storing ``n`` streaming states of the default kind as the
    worker writes them after a batch (``seq`` and ``data``: the state row and its redelivery
    bookkeeping, here the one id of the batch's reading and the bound of its order), then
    removed."""
    kind = str(Settings.model_fields["default_kind"].default)
    plugin = stateful_kind(kind)
    if plugin is None:
        return 0.0
    start = 1_700_000_000
    fit = plugin.fit(
        prepare_training_data(
            [start + 60 * i for i in range(10_080)],
            (50 + 5 * np.sin(np.arange(10_080) * 2 * np.pi / 1440)).tolist(),
        ),
        FitOptions(),
    )
    initial = plugin.initial_state(fit.params)
    r = redis.Redis.from_url(ctx.redis_url)
    try:
        before = int(r.info("memory")["used_memory"])
        keys = [state_key(f"mem-state-{i:07d}") for i in range(n)]
        for lo in range(0, n, 10_000):
            with r.pipeline(transaction=False) as pipe:
                for i in range(lo, min(n, lo + 10_000)):
                    entry = (1_796_000_000_000 + i, 0)
                    state = SeriesState(kind, 1, initial, count=1, ids=[f"{entry[0]}-0"], top=entry)
                    pipe.set(keys[i], b"1\n" + state.to_bytes())
                pipe.execute()
        after = int(r.info("memory")["used_memory"])
        for lo in range(0, n, 10_000):
            r.delete(*keys[lo : lo + 10_000])
    finally:
        r.close()
    return (after - before) / n
