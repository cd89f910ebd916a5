"""Stream scenarios: one worker against a no-op consumer, two workers against one."""

from __future__ import annotations

import os

from bench.context import Context
from bench.drains import run_noop, run_workers
from bench.report import Row, reported
from bench.streams import (
    check_drained,
    drop_streams,
    publish_readings,
    redis_cpu,
    stream_count,
)


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
        reported(scenario, "anomaly events written", events, "events"),
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
        reported(scenario, "Redis server CPU during the drain", redis_used, "s"),
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
        reported(scenario, "Redis server CPU, two workers", redis_used, "s"),
    ]
