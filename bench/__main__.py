"""`python -m bench`: start the service on the embedded default, run every scenario beside its
baseline in the same run, print one table and write bench/results/bench.json."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import psycopg
import redis

from bench.app import wait_healthy
from detector.kinds.static import StaticModel
from detector.redis_keys import model_key
from detector.settings import Settings
from detector.store.codec import ModelVersion
from detector.store.connections import apply_schema_sync
from embedded.servers import PostgresServer, RedisServer, free_port
from ingest.publisher import Publisher, checked_fields
from tests.conftest import service_env

ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger("bench")


@dataclass
class Row:
    scenario: str
    figure: str
    value: float
    unit: str
    baseline: float | None
    baseline_label: str
    ratio: float | None
    target: str
    met: bool | None


@dataclass
class Context:
    settings: Settings
    api_url: str
    api_port: int
    api_pid: int
    redis_url: str
    conninfo: str
    data_dir: Path
    quick: bool


def env_for(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in service_env(settings).items() if not k.startswith("MLFLOW")}
    return env


def loadgen(
    ctx: Context,
    paths: list[str],
    bodies: list[bytes],
    *,
    connections: int = 16,
    duration: float = 8.0,
    warmup: float = 1.0,
) -> dict[str, float]:
    """Drive the server from a separate process so client and server do not share a GIL."""
    spec = json.dumps({"paths": paths, "bodies": [b.decode() for b in bodies]})
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.loadgen",
            "--port",
            str(ctx.api_port),
            "--connections",
            str(connections),
            "--duration",
            str(duration),
            "--warmup",
            str(warmup),
        ],
        input=spec.encode(),
        capture_output=True,
        check=True,
        cwd=ROOT,
    )
    result: dict[str, float] = json.loads(out.stdout)
    return result


def fit_series(ctx: Context, ids: list[str], concurrency: int = 16) -> None:
    """Fit small models for many series over HTTP (the real path), in parallel."""
    rng = np.random.default_rng(0)
    values = rng.normal(50, 5, 32).tolist()
    body = orjson.dumps({"timestamps": list(range(32)), "values": values})

    async def run() -> None:
        limits = httpx.Limits(max_connections=concurrency)
        async with httpx.AsyncClient(base_url=ctx.api_url, limits=limits, timeout=120) as http:
            queue = list(ids)

            async def worker() -> None:
                while queue:
                    sid = queue.pop()
                    for attempt in range(3):
                        try:
                            r = await http.post(
                                f"/fit/{sid}",
                                content=body,
                                headers={"content-type": "application/json"},
                            )
                            break
                        except (httpx.ReadError, httpx.RemoteProtocolError):
                            # A pooled keep-alive connection the server closed as we reused
                            # it; a repeated fit only adds a version, which is harmless here.
                            if attempt == 2:
                                raise
                    r.raise_for_status()

            await asyncio.gather(*(worker() for _ in range(concurrency)))

    asyncio.run(run())


def predict_requests(ids: list[str], rng: np.random.Generator) -> tuple[list[str], list[bytes]]:
    paths = [f"/predict/{sid}" for sid in ids]
    bodies = [
        orjson.dumps({"timestamp": 1_700_000_000 + i, "value": float(v)})
        for i, v in enumerate(rng.normal(50, 8, len(ids)))
    ]
    return paths, bodies


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ---------------------------------------------------------------- scenarios


def scenario_predict(ctx: Context) -> list[Row]:
    ids = [f"bench-{i:05d}" for i in range(1000)]
    fit_series(ctx, ids)
    rng = np.random.default_rng(1)
    order = rng.permutation(len(ids) * 4) % len(ids)
    chosen = [ids[i] for i in order]
    paths, bodies = predict_requests(chosen, rng)
    duration = 4.0 if ctx.quick else 8.0
    ours = loadgen(ctx, paths, bodies, duration=duration)
    base = loadgen(
        ctx,
        [p.replace("/predict/", "/baseline/predict/") for p in paths],
        bodies,
        duration=duration,
    )
    rps_ratio = ours["rps"] / base["rps"]
    p99_ratio = ours["p99_ms"] / base["p99_ms"]
    return [
        Row(
            "REST predict, 16 connections, 1,000 series",
            "throughput",
            ours["rps"],
            "req/s",
            base["rps"],
            "constant route, same body validation",
            rps_ratio,
            "≥ 0.85×",
            rps_ratio >= 0.85,
        ),
        Row(
            "REST predict, 16 connections, 1,000 series",
            "p50 latency",
            ours["p50_ms"],
            "ms",
            base["p50_ms"],
            "constant route",
            ours["p50_ms"] / base["p50_ms"],
            "report",
            None,
        ),
        Row(
            "REST predict, 16 connections, 1,000 series",
            "p99 latency",
            ours["p99_ms"],
            "ms",
            base["p99_ms"],
            "constant route",
            p99_ratio,
            "≤ 1.2×",
            p99_ratio <= 1.2,
        ),
    ]


def scenario_series_scaling(ctx: Context) -> list[Row]:
    """Predict p50 as the number of stored series grows; each point fits more series first."""
    steps = [1, 1_000, 10_000] if ctx.quick else [1, 1_000, 10_000, 100_000]
    rng = np.random.default_rng(2)
    stored = 0
    rows: list[Row] = []
    first_p50 = None
    touched: set[str] = set()
    for target in steps:
        ids = [f"scale-{i:06d}" for i in range(stored, target)]
        started = time.perf_counter()
        fit_series(ctx, ids, concurrency=24)
        if ids:
            log.info("stored %d series in %.1f s", len(ids), time.perf_counter() - started)
        stored = target
        # The same size of working set at every step (1,000 active series drawn from those
        # stored, warmed first): what is measured is the cost of *storing* more series.
        # First-touch (cold) latency is a separate row below.
        active = rng.choice(stored, size=min(stored, 1_000), replace=False)
        probe = [f"scale-{int(i):06d}" for i in rng.choice(active, 4000)]
        touched.update(probe)
        paths, bodies = predict_requests(probe, rng)
        loadgen(ctx, paths, bodies, connections=4, duration=2.0)  # warm the working set
        result = loadgen(ctx, paths, bodies, connections=4, duration=3.0)
        if first_p50 is None:
            first_p50 = result["p50_ms"]
        ratio = result["p50_ms"] / first_p50
        rows.append(
            Row(
                "REST predict vs series stored",
                f"p50 at {target:,} series",
                result["p50_ms"],
                "ms",
                first_p50,
                "itself at 1 series",
                ratio,
                "≤ 1.2×",
                ratio <= 1.2,
            )
        )
    # Cold: 4,000 series never asked before, each answered once (pointer and model loaded
    # from Redis on the way).
    cold_ids = [f"scale-{int(i):06d}" for i in rng.permutation(stored)[:4000]]
    cold_ids = [c for c in cold_ids if c not in touched][:2000]
    paths, bodies = predict_requests(cold_ids, rng)
    cold = loadgen(ctx, paths, bodies, connections=4, duration=0.3, warmup=0.0)
    rows.append(
        Row(
            "REST predict vs series stored",
            f"p50, first touch, {stored:,} series",
            cold["p50_ms"],
            "ms",
            first_p50,
            "warm, at 1 series",
            cold["p50_ms"] / first_p50 if first_p50 else None,
            "report",
            None,
        )
    )
    return rows


def scenario_batch(ctx: Context) -> list[Row]:
    n = 100_000
    rng = np.random.default_rng(3)
    fit_series(ctx, ["batch-1"])
    body = orjson.dumps({"timestamps": list(range(n)), "values": rng.normal(50, 8, n).tolist()})
    repeats = 5 if ctx.quick else 10
    # Driven by the load generator's process (one keep-alive connection, as a client that
    # sends batches back to back), so the figure is the server's, not this process' client.
    result = loadgen(
        ctx, ["/predict/batch-1/batch"], [body], connections=1, duration=4.0 if ctx.quick else 8.0
    )
    if result["errors"]:
        raise RuntimeError(f"batch predict answered errors: {result}")
    ours = n * result["rps"]
    base = n * repeats / _time_it(lambda: orjson.loads(body), repeats)
    ratio = ours / base
    return [
        Row(
            "batch predict, 100,000 points a request",
            "throughput",
            ours,
            "points/s",
            base,
            "orjson.loads of the same body alone",
            ratio,
            "≥ 0.5×",
            ratio >= 0.5,
        )
    ]


def scenario_fit(ctx: Context) -> list[Row]:
    n = 1_000_000
    rng = np.random.default_rng(4)
    ts = (1_600_000_000 + np.arange(n) * 60).tolist()
    body = orjson.dumps({"timestamps": ts, "values": rng.normal(50, 8, n).tolist()})
    repeats = 2 if ctx.quick else 3
    with httpx.Client(base_url=ctx.api_url, timeout=300) as http:
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            http.post(
                "/fit/fit-1m", content=body, headers={"content-type": "application/json"}
            ).raise_for_status()
            seconds.append(time.perf_counter() - start)
    ours = min(seconds)

    # The baseline stores the same points the way a fit must: parsed, then COPYed into a
    # logged table of training_points' shape and committed (durable, like ours). A temporary
    # table would skip the write-ahead log and measure less than durability costs.
    with psycopg.connect(ctx.conninfo, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS copy_baseline (model_id bigint, ts bigint, value float8)"
        )

    def parse_and_copy() -> None:
        parsed = orjson.loads(body)
        rows = np.empty(
            n,
            dtype=[
                ("n", ">i2"),
                ("l0", ">i4"),
                ("m", ">i8"),
                ("l1", ">i4"),
                ("a", ">i8"),
                ("l2", ">i4"),
                ("b", ">f8"),
            ],
        )
        rows["n"], rows["l0"], rows["l1"], rows["l2"] = 3, 8, 8, 8
        rows["m"] = 1
        rows["a"] = np.asarray(parsed["timestamps"], dtype=np.int64)
        rows["b"] = np.asarray(parsed["values"], dtype=np.float64)
        with psycopg.connect(ctx.conninfo) as conn:
            with conn.cursor().copy("COPY copy_baseline FROM STDIN (FORMAT BINARY)") as copy:
                copy.write(b"PGCOPY\n\xff\r\n\x00" + bytes(8))
                copy.write(rows.tobytes())
                copy.write(b"\xff\xff")
            conn.commit()

    base = min(_time_it(parse_and_copy, 1) for _ in range(repeats))
    ratio = ours / base
    return [
        Row(
            "fit, 1,000,000 points over HTTP",
            "end-to-end time",
            ours,
            "s",
            base,
            "orjson parse + binary COPY of the same points into a logged table",
            ratio,
            "≤ 1.5×",
            ratio <= 1.5,
        )
    ]


def scenario_memory(ctx: Context) -> list[Row]:
    rng = np.random.default_rng(5)
    r = redis.Redis.from_url(ctx.redis_url)
    models = int(r.eval("return #redis.call('KEYS', 'model:*')", 0))  # type: ignore[arg-type]
    r.close()
    ids = [f"scale-{i:06d}" for i in range(min(models, 100_000))]
    paths, bodies = predict_requests(ids, rng)
    # Touch every model once so each sits in the API's in-process cache.
    loadgen(ctx, paths, bodies, connections=16, duration=3.0 if ctx.quick else 6.0)
    n = 20_000 if ctx.quick else 100_000
    per_model = redis_bytes_per_model(ctx, n, rng)
    return [
        Row(
            "memory",
            "API RSS with the models cached",
            rss_mb(ctx.api_pid),
            "MiB",
            None,
            "—",
            None,
            "report",
            None,
        ),
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
    ]


def redis_bytes_per_model(ctx: Context, n: int, rng: np.random.Generator) -> float:
    """used_memory before and after storing ``n`` one-version series exactly as the store does
    (its own ``to_redis`` form, the version field and the ``latest`` pointer), then removed."""
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
                        StaticModel(mean=float(means[i]), std=float(stds[i])),
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


# ---------------------------------------------------------------- stream scenarios

STREAM_SERIES = 1000
_STOPPED = re.compile(r"stopped: (\d+) readings in ([0-9.]+) s")


@dataclass
class Drain:
    """One consumer process's drain: entries it handled, its own timing, its CPU."""

    entries: int
    seconds: float
    cpu_seconds: float


def stream_names(tag: str) -> dict[str, str]:
    return {
        "STREAM_READINGS": f"bench:readings:{tag}",
        "STREAM_ANOMALIES": f"bench:anomalies:{tag}",
        "STREAM_DEAD": f"bench:dead:{tag}",
    }


def stream_count(ctx: Context) -> int:
    return 200_000 if ctx.quick else 1_000_000


def stream_models(ctx: Context) -> list[str]:
    """Series with a model each, fitted over HTTP once (the real path)."""
    ids = [f"stream-{i:04d}" for i in range(STREAM_SERIES)]
    r = redis.Redis.from_url(ctx.redis_url)
    fitted = r.exists(model_key(ids[-1]))
    r.close()
    if not fitted:
        fit_series(ctx, ids)
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
    r = redis.Redis.from_url(ctx.redis_url)
    r.delete(*stream_names(tag).values())
    r.close()


def spawn(
    args: list[str], env: dict[str, str], log_path: Path, *, profile: bool = False
) -> subprocess.Popen[bytes]:
    """Start ``python <args>``; with ``profile`` and BENCH_PROFILE=<dir>, under ``py-spy
    record`` (collapsed stacks written to that folder; its CPU then counts in the child's)."""
    command = [sys.executable, *args]
    profile_dir = os.environ.get("BENCH_PROFILE")
    if profile and profile_dir:
        out = Path(profile_dir) / f"{log_path.stem}.txt"
        command = [
            "py-spy",
            "record",
            "--idle",
            "-r",
            "250",
            "-f",
            "raw",
            "-o",
            str(out),
            "--",
            *command,
        ]
    with log_path.open("wb") as log_file:
        return subprocess.Popen(
            command, env=env, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT
        )


def reap(proc: subprocess.Popen[bytes]) -> float:
    """Wait for a child and return the CPU seconds it used (user + system)."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
    return usage.ru_utime + usage.ru_stime


def run_workers(ctx: Context, tag: str, n: int) -> list[Drain]:
    """``n`` worker processes drain one stream's group in burst mode."""
    env = env_for(ctx.settings) | stream_names(tag) | {"METRICS_PORT": "0"}
    procs = [
        (
            spawn(
                ["-m", "detector", "--burst", "--consumer", f"bench-{tag}-{i}"],
                env,
                ctx.data_dir / f"worker-{tag}-{i}.log",
                profile=True,
            ),
            ctx.data_dir / f"worker-{tag}-{i}.log",
        )
        for i in range(n)
    ]
    drains = []
    for proc, log_path in procs:
        cpu = reap(proc)
        found = _STOPPED.search(log_path.read_text())
        if found is None:
            raise RuntimeError(f"no summary line in {log_path}")
        drains.append(Drain(int(found[1]), float(found[2]), cpu))
    return drains


def run_noop(ctx: Context, tag: str, count: int) -> Drain:
    env = env_for(ctx.settings) | stream_names(tag)
    log_path = ctx.data_dir / f"noop-{tag}.json"
    proc = spawn(["-m", "bench.noop_consumer", "--count", str(count)], env, log_path)
    cpu = reap(proc)
    result = json.loads(log_path.read_text().splitlines()[-1])
    return Drain(int(result["entries"]), float(result["seconds"]), cpu)


def redis_cpu(ctx: Context) -> float:
    r = redis.Redis.from_url(ctx.redis_url)
    info = r.info("cpu")
    r.close()
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def check_drained(ctx: Context, tag: str, count: int) -> int:
    """Every reading acknowledged; returns the anomaly events written."""
    names = stream_names(tag)
    r = redis.Redis.from_url(ctx.redis_url)
    try:
        pending = int(r.xpending(names["STREAM_READINGS"], "detector")["pending"])
        events = int(r.xlen(names["STREAM_ANOMALIES"]))
    finally:
        r.close()
    if pending:
        raise RuntimeError(f"{pending} readings of {count} still pending after the drain")
    return events


def scenario_stream(ctx: Context) -> list[Row]:
    count = stream_count(ctx)
    publish_readings(ctx, ["one", "noop"], count)
    base = run_noop(ctx, "noop", count)
    drop_streams(ctx, "noop")
    redis_before = redis_cpu(ctx)
    (ours,) = run_workers(ctx, "one", 1)
    redis_used = redis_cpu(ctx) - redis_before
    events = check_drained(ctx, "one", count)
    drop_streams(ctx, "one")
    if ours.entries != count or base.entries != count:
        raise RuntimeError(f"drained {ours.entries} and {base.entries} of {count}")
    rate, base_rate = count / ours.seconds, count / base.seconds
    ratio = rate / base_rate
    scenario = f"stream: one worker drains {count:,} readings"
    return [
        Row(
            scenario,
            "throughput",
            rate,
            "readings/s",
            base_rate,
            "no-op XREADGROUP + XACK consumer",
            ratio,
            "≥ 0.5× and ≥ 100,000/s",
            ratio >= 0.5 and rate >= 100_000,
        ),
        Row(scenario, "anomaly events written", events, "events", None, "—", None, "report", None),
        Row(
            scenario,
            "worker CPU",
            ours.cpu_seconds,
            "s",
            base.cpu_seconds,
            "no-op consumer CPU",
            ours.cpu_seconds / base.cpu_seconds,
            "report",
            None,
        ),
        Row(
            scenario,
            "Redis server CPU during the drain",
            redis_used,
            "s",
            None,
            "—",
            None,
            "report",
            None,
        ),
    ]


def scenario_stream_scaling(ctx: Context) -> list[Row]:
    count = stream_count(ctx)
    publish_readings(ctx, ["solo", "pair"], count)
    (solo,) = run_workers(ctx, "solo", 1)
    check_drained(ctx, "solo", count)
    drop_streams(ctx, "solo")
    redis_before = redis_cpu(ctx)
    pair = run_workers(ctx, "pair", 2)
    redis_used = redis_cpu(ctx) - redis_before
    check_drained(ctx, "pair", count)
    drop_streams(ctx, "pair")
    if sum(d.entries for d in pair) < count:
        raise RuntimeError(f"two workers drained {sum(d.entries for d in pair)} of {count}")
    solo_rate = count / solo.seconds
    pair_rate = count / max(d.seconds for d in pair)
    ratio = pair_rate / solo_rate
    scenario = "stream: two workers on one group"
    cpus = ", ".join(f"{d.cpu_seconds:.1f} s ({d.entries:,} readings)" for d in pair)
    return [
        Row(
            scenario,
            "throughput",
            pair_rate,
            "readings/s",
            solo_rate,
            "one worker",
            ratio,
            f"≥ 1.6× ({os.cpu_count()} cores)",
            ratio >= 1.6,
        ),
        Row(
            scenario,
            "CPU of the two workers",
            sum(d.cpu_seconds for d in pair),
            "s",
            solo.cpu_seconds,
            f"one worker; each: {cpus}",
            None,
            "report",
            None,
        ),
        Row(
            scenario,
            "Redis server CPU, two workers",
            redis_used,
            "s",
            None,
            "—",
            None,
            "report",
            None,
        ),
    ]


def _time_it(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return time.perf_counter() - start


SCENARIOS: dict[str, Callable[[Context], list[Row]]] = {
    "predict": scenario_predict,
    "batch": scenario_batch,
    "fit": scenario_fit,
    "scaling": scenario_series_scaling,
    "memory": scenario_memory,
    "stream": scenario_stream,
    "stream2": scenario_stream_scaling,
}


def print_table(rows: list[Row]) -> None:
    header = f"{'scenario':44} {'figure':34} {'value':>12} {'baseline':>12} {'ratio':>7}  target"
    print(header)
    print("-" * len(header))
    for r in rows:
        base = f"{r.baseline:,.3f}" if r.baseline is not None else "—"
        ratio = f"{r.ratio:.2f}×" if r.ratio is not None else "—"
        mark = "" if r.met is None else ("  ok" if r.met else "  MISSED")
        print(
            f"{r.scenario:44} {r.figure:34} {r.value:>12,.3f} {base:>12} {ratio:>7}  "
            f"{r.target}{mark}  [{r.unit}]"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", nargs="*", choices=list(SCENARIOS), help="scenarios to run")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "bench.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not one line per request

    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        data_dir = Path(tmp)
        redis_server = RedisServer(data_dir / "redis", free_port()).start()
        pg_server = PostgresServer(data_dir / "pg", free_port()).start()
        settings = Settings(**redis_server.settings_fields(), **pg_server.settings_fields())
        apply_schema_sync(settings.postgres_conninfo())
        api_port = free_port()
        api = subprocess.Popen(
            [sys.executable, "-m", "bench.app", "--port", str(api_port)],
            env=env_for(settings),
            cwd=ROOT,
        )
        url = f"http://127.0.0.1:{api_port}"
        try:
            wait_healthy(url)
            ctx = Context(
                settings,
                url,
                api_port,
                api.pid,
                redis_server.admin_url(),  # the scenarios read INFO, an admin command
                settings.postgres_conninfo(),
                data_dir,
                args.quick,
            )
            rows: list[Row] = []
            for name in args.only or list(SCENARIOS):
                log.info("scenario %s", name)
                rows.extend(SCENARIOS[name](ctx))
        finally:
            api.terminate()
            api.wait(30)
            pg_server.stop()
            redis_server.stop()

    print()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    )
    print_table(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps([asdict(r) for r in rows], indent=2))
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
