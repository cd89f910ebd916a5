"""Consumer processes that drain a benchmark stream: the detector's workers and the no-op
baseline, each with its own timing and CPU."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from bench.context import Context
from bench.harness import env_for, reap, spawn
from bench.streams import stream_names

_STOPPED = re.compile(r"stopped: (\d+) readings in ([0-9.]+) s")


@dataclass
class Drain:
    """One consumer process's drain: entries it handled, its own timing, its CPU."""

    entries: int
    seconds: float
    cpu_seconds: float


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
    """The no-op consumer drains ``count`` entries of the stream tagged ``tag``."""
    env = env_for(ctx.settings) | stream_names(tag)
    log_path = ctx.data_dir / f"noop-{tag}.json"
    proc = spawn(["-m", "bench.noop_consumer", "--count", str(count)], env, log_path)
    cpu = reap(proc)
    result = json.loads(log_path.read_text().splitlines()[-1])
    return Drain(int(result["entries"]), float(result["seconds"]), cpu)


@dataclass
class LiveDrain:
    """A consumer running while the readings are published: seconds from the first XADD to
    the last acknowledgement, its CPU, and the producer's own publishing time."""

    seconds: float
    cpu_seconds: float
    publish_seconds: float


def run_live(
    ctx: Context, tag: str, count: int, consumer: str, mix: tuple[str, ...] = ()
) -> LiveDrain:
    """Start ``consumer`` ("worker": ``python -m detector`` as `make run` starts it, or
    "noop") on the empty stream tagged ``tag``, publish ``count`` readings of the realistic
    mix from another process, and time from the first XADD until the group has every entry
    delivered and acknowledged. ``mix``: the producer's options of another mix (its series)."""
    names = stream_names(tag)
    stream, group = names["STREAM_READINGS"], "detector"
    r = redis.Redis.from_url(ctx.redis_url, decode_responses=True)
    spawned: list[subprocess.Popen[bytes]] = []
    try:
        r.xgroup_create(stream, group, id="0", mkstream=True)
        env = env_for(ctx.settings) | names | {"METRICS_PORT": "0"}
        name = f"live-{tag}"
        log_path = ctx.data_dir / f"live-{tag}.log"
        if consumer == "worker":
            args = ["-m", "detector", "--consumer", name]
        else:
            args = ["-m", "bench.noop_consumer", "--count", str(count), "--block", "2000"]
            args += ["--consumer", name]
        proc = spawn(args, env, log_path, profile=consumer == "worker")
        spawned.append(proc)
        _wait_reading(r, proc.pid, log_path)
        out_path = ctx.data_dir / f"publisher-{tag}.json"
        publisher = spawn(
            ["-m", "bench.live_publisher", "--stream", stream, "--count", str(count), *mix],
            env,
            out_path,
        )
        spawned.append(publisher)
        # Polled while the producer runs (not after it exits: tearing a process down takes
        # a good part of a second), with the group, until every entry is acknowledged.
        published: dict[str, Any] | None = None
        while True:
            if published is None and out_path.read_text().endswith("}"):
                published = json.loads(out_path.read_text().splitlines()[-1])
            if published is not None:
                info = next(g for g in r.xinfo_groups(stream) if g["name"] == group)
                if info["pending"] == 0 and info["last-delivered-id"] == published["last_id"]:
                    last_ack = time.time()
                    break
            elif _exited(publisher.pid):
                reap(publisher)  # raises with its exit code
                raise RuntimeError(f"the producer printed nothing; see {out_path}")
            if _exited(proc.pid) and consumer == "worker":  # the no-op exits after its last ack
                raise RuntimeError(f"{args!r} exited early; see {log_path}")
            time.sleep(0.002)
        reap(publisher)
        if consumer == "worker":
            proc.send_signal(signal.SIGTERM)
        cpu = reap(proc)
        spawned.clear()
    finally:
        for child in spawned:  # a failed run leaves no consumer or producer behind
            if child.poll() is None:
                child.kill()
                child.wait()
        r.close()
    return LiveDrain(last_ack - float(published["first_xadd"]), cpu, float(published["seconds"]))


def _exited(pid: int) -> bool:
    """Whether child ``pid`` has exited, leaving it to be reaped (its CPU read) later."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _wait_reading(r: redis.Redis, pid: int, log_path: Path) -> None:
    """Until a client waits in a blocking XREADGROUP (the consumer, on its empty stream:
    Redis 6.2 lists a consumer in the group only once it was delivered something)."""
    deadline = time.monotonic() + 60
    while not any(
        c.get("cmd") == "xreadgroup" and "b" in c.get("flags", "") for c in r.client_list()
    ):
        if _exited(pid) or time.monotonic() > deadline:
            tail = log_path.read_text()[-2000:]
            raise RuntimeError(f"the consumer did not start reading:\n{tail}")
        time.sleep(0.02)
