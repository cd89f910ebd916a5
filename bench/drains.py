"""Consumer processes that drain a benchmark stream: the detector's workers and the no-op
baseline, each with its own timing and CPU."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

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
