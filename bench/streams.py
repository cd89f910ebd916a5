"""The benchmark's Redis streams: their names, the readings published to them (over series
fitted once), and the checks and Redis CPU read around a drain."""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import redis

from bench.client import fit_series
from bench.context import Context
from detector.redis_keys import model_key
from detector.store.codec import ModelVersion
from ingest.publisher import Publisher, checked_fields

STREAM_SERIES = 1000
log = logging.getLogger("bench")


def stream_names(tag: str) -> dict[str, str]:
    """The stream settings (as environment variables) of the streams tagged ``tag``."""
    return {
        "STREAM_READINGS": f"bench:readings:{tag}",
        "STREAM_ANOMALIES": f"bench:anomalies:{tag}",
        "STREAM_DEAD": f"bench:dead:{tag}",
    }


# Every anomaly of the realistic mix opens an episode of its own: a series' anomalies are this
# many rounds (of one reading per series, one second apart) apart, far above the default quiet
# period of 3,600 s at 1,000 series. One reading in ANOMALY_EVERY is anomalous.
ANOMALY_EVERY = 100
START = 1_700_000_000


def stream_count(ctx: Context) -> int:
    """Readings a stream scenario publishes: BENCH_STREAM_COUNT if set, else 200,000 with
    --quick, else 1,000,000."""
    if os.environ.get("BENCH_STREAM_COUNT"):
        return int(os.environ["BENCH_STREAM_COUNT"])
    return 200_000 if ctx.quick else 1_000_000


def series_ids(n: int, prefix: str = "stream") -> list[str]:
    """The ids of the stream scenarios' ``n`` series."""
    return [f"{prefix}-{i:04d}" for i in range(n)]


def realistic_mix(
    count: int, n_series: int, seed: int = 7
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """``count`` readings over ``n_series`` series (each series once a round, in a shuffled
    order, event time one second a reading), 1 in ``ANOMALY_EVERY`` far above its model's
    bound and every other one well inside it. Series s is anomalous in the rounds r with
    r ≡ s (mod ANOMALY_EVERY), so its anomalies are ANOMALY_EVERY × n_series seconds apart in
    event time: each is an episode of its own. Returns series indexes, timestamps, values
    and how many are anomalous."""
    rng = np.random.default_rng(seed)
    rounds = -(-count // n_series)
    order = rng.permuted(np.tile(np.arange(n_series), (rounds, 1)), axis=1)
    series = order.reshape(-1)[:count]
    round_of = np.arange(count) // n_series
    anomalous = (round_of % ANOMALY_EVERY) == (series % ANOMALY_EVERY)
    # The models (bench.client.fit_series) have μ ≈ 49.2, σ ≈ 4.0: 45–54 is within ±1.3σ.
    values = np.where(anomalous, 150.0, rng.uniform(45.0, 54.0, count).round(3))
    timestamps = START + np.arange(count, dtype=np.int64)
    return series, timestamps, values, int(anomalous.sum())


def stream_models(ctx: Context, kind: str = "static") -> list[str]:
    """Series whose latest model is of ``kind``, fitted over HTTP (the real path) when it is
    not: 32 readings at the stream's per-series cadence (one every STREAM_SERIES seconds),
    ending where the stream starts, so a kind whose time scales follow the cadence sees the
    one it will stream at."""
    ids = series_ids(STREAM_SERIES)
    r = redis.Redis.from_url(ctx.redis_url)
    latest = r.hget(model_key(ids[-1]), "latest")
    entry = r.hget(model_key(ids[-1]), latest) if latest else None
    r.close()
    # The kind as the store reads it (the compact form's own decoding, whatever its layout).
    current = (
        None
        if entry is None or latest is None
        else ModelVersion.from_redis(ids[-1], int(latest), entry.decode()).model.kind
    )
    if current != kind:
        cadence = STREAM_SERIES
        fit_series(
            ctx,
            ids,
            kind=kind,
            timestamps=[START - cadence * (32 - i) for i in range(32)],
        )
    return ids


def publish_readings(ctx: Context, tags: list[str], count: int) -> None:
    """``count`` readings over the stream models' series, 1 % of them far above μ + 3σ,
    published identically to each tag's stream with our Publisher; then the group is made."""
    ids = stream_models(ctx)
    rng = np.random.default_rng(6)
    series = rng.integers(0, len(ids), count)
    values = rng.normal(50, 5, count)
    values[rng.random(count) < 0.01] = 150.0
    client = redis.Redis.from_url(ctx.redis_url, decode_responses=True)
    started = time.perf_counter()
    try:
        publishers = [
            Publisher(client, stream=stream_names(tag)["STREAM_READINGS"], batch_size=10_000)
            for tag in tags
        ]
        for i in range(count):
            fields = checked_fields(ids[series[i]], 1_700_000_000 + i, float(values[i]))
            for publisher in publishers:
                publisher.publish_fields(fields)
        for publisher in publishers:
            publisher.flush()
            client.xgroup_create(publisher.stream, "detector", id="0")
    finally:
        client.close()
    log.info(
        "published %d readings to %d stream(s) in %.1f s",
        count,
        len(tags),
        time.perf_counter() - started,
    )


def drop_streams(ctx: Context, tag: str) -> None:
    """Delete the streams tagged ``tag``."""
    r = redis.Redis.from_url(ctx.redis_url)
    r.delete(*stream_names(tag).values())
    r.close()


def redis_cpu(ctx: Context) -> float:
    """CPU seconds the Redis server has used (user + system)."""
    r = redis.Redis.from_url(ctx.redis_url)
    info = r.info("cpu")
    r.close()
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def check_drained(ctx: Context, tag: str, count: int) -> int:
    """Every reading acknowledged; returns the anomaly events written (not the other types)."""
    names = stream_names(tag)
    r = redis.Redis.from_url(ctx.redis_url)
    try:
        pending = int(r.xpending(names["STREAM_READINGS"], "detector")["pending"])
        # Anomaly events only: an incident's or a silent series' share the stream.
        events = sum(
            fields.get(b"type", b"anomaly") == b"anomaly"
            for _, fields in r.xrange(names["STREAM_ANOMALIES"])
        )
    finally:
        r.close()
    if pending:
        raise RuntimeError(f"{pending} readings of {count} still pending after the drain")
    return events
