"""Stream scenarios: one worker against a no-op consumer (readings published first, and
published while it runs), two workers against one."""

from __future__ import annotations

import os

import psycopg

from bench.context import Context
from bench.drains import LiveDrain, run_live, run_noop, run_workers
from bench.report import Row, reported
from bench.scenarios.bulk_fit import bulk_fit
from bench.streams import (
    STREAM_SERIES,
    check_drained,
    drop_streams,
    publish_readings,
    realistic_mix,
    redis_cpu,
    stream_count,
    stream_models,
    stream_names,
)
from detector.settings import Settings


def scenario_stream(ctx: Context) -> list[Row]:
    return scenario_stream_live(ctx) + scenario_stream_backlog(ctx)


def scenario_stream_live(ctx: Context) -> list[Row]:
    """The realistic mix, published while the consumer runs, timed from the first XADD to the
    last acknowledgement: `python -m detector` as `make run` starts it against the no-op
    consumer on the same readings; the series fitted ``static``, then refitted with the
    default kind (what a fit without options makes) and streamed again."""
    count = stream_count(ctx)
    base = run_live(ctx, "live-noop", count, "noop")
    drop_streams(ctx, "live-noop")
    rows, static = _live_rows(ctx, "static", count, base)
    default = str(Settings.model_fields["default_kind"].default)
    more, ours = _live_rows(ctx, default, count, base, tag="live-default")
    rows += more
    rate, static_rate = count / ours.seconds, count / static.seconds
    rows.append(
        Row(
            f"stream live: the default kind ({default}) against static, same mix",
            "throughput",
            rate,
            "readings/s",
            static_rate,
            "the static kind, same readings, same run",
            rate / static_rate,
            "≥ 0.9×",
            rate / static_rate >= 0.9,
        )
    )
    return rows


def _live_rows(
    ctx: Context, kind: str, count: int, base: LiveDrain, tag: str = "live-one"
) -> tuple[list[Row], LiveDrain]:
    stream_models(ctx, kind)
    expected = realistic_mix(count, STREAM_SERIES)[3]
    redis_before = redis_cpu(ctx)
    ours = run_live(ctx, tag, count, "worker")
    redis_used = redis_cpu(ctx) - redis_before
    events = check_drained(ctx, tag, count)
    drop_streams(ctx, tag)
    with psycopg.connect(ctx.conninfo) as conn:
        recorded, episodes, onsets = conn.execute(
            "SELECT count(*), count(DISTINCT episode_id), count(*) FILTER (WHERE onset) "
            "FROM anomalies WHERE source_stream = %s",
            (stream_names(tag)["STREAM_READINGS"],),
        ).fetchone() or (0, 0, 0)
    if not events == recorded == episodes == onsets == expected:
        raise RuntimeError(
            f"{kind}: expected {expected} events, each its own episode: {events} written, "
            f"{recorded} recorded, {episodes} episodes, {onsets} onsets"
        )
    rate, base_rate = count / ours.seconds, count / base.seconds
    ratio = rate / base_rate
    scenario = (
        f"stream live ({kind}): {count:,} readings, {STREAM_SERIES:,} series, "
        f"{expected:,} anomalies (1 %, each its own episode), first XADD → last ack"
    )
    return [
        Row(
            scenario,
            "throughput",
            rate,
            "readings/s",
            base_rate,
            "no-op XREADGROUP + XACK consumer, same publisher",
            ratio,
            "≥ 0.6×",
            ratio >= 0.6,
        ),
        reported(scenario, "anomaly events = episodes recorded", events, "events"),
        _cpu_row(scenario, ours.cpu_seconds, base.cpu_seconds),
        reported(scenario, "publishing time alone", ours.publish_seconds, "s"),
        reported(scenario, "Redis server CPU during the drain", redis_used, "s"),
    ], ours


def scenario_stream_backlog(ctx: Context) -> list[Row]:
    """The readings published first, then drained: the worker's own time against the no-op
    consumer's."""
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
    scenario = f"stream backlog: one worker drains {count:,} readings"
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
        _cpu_row(scenario, ours.cpu_seconds, base.cpu_seconds),
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


def scenario_stream_wide(ctx: Context) -> list[Row]:
    """The worker's throughput with readings spread over many series (``BENCH_WIDE_SERIES``,
    default 1,000,000; ``--quick`` 20,000), bulk-fitted ``static`` first: as many readings as
    series, each series once, 1 % of them anomalous (each its own episode), published while
    the consumer runs, against the no-op consumer on the same readings. Every reading is its
    series' first in the worker: its latest pointer and model are read from Redis."""
    n = int(os.environ.get("BENCH_WIDE_SERIES") or (20_000 if ctx.quick else 1_000_000))
    prefix = "wide"
    seconds, _ = bulk_fit(ctx, 0, n, "static", name=lambda i: f"{prefix}-{i:04d}")
    mix = ("--series", str(n), "--prefix", prefix)
    base = run_live(ctx, "wide-noop", n, "noop", mix)
    drop_streams(ctx, "wide-noop")
    redis_before = redis_cpu(ctx)
    ours = run_live(ctx, "wide", n, "worker", mix)
    redis_used = redis_cpu(ctx) - redis_before
    events = check_drained(ctx, "wide", n)
    drop_streams(ctx, "wide")
    expected = realistic_mix(n, n)[3]
    if events != expected:
        raise RuntimeError(f"expected {expected} anomaly events over {n} series, got {events}")
    rate, base_rate = n / ours.seconds, n / base.seconds
    scenario = (
        f"stream live (static), {n:,} readings over {n:,} series (each once, 1 % anomalous), "
        "first XADD → last ack"
    )
    return [
        Row(
            scenario,
            "throughput",
            rate,
            "readings/s",
            base_rate,
            "no-op XREADGROUP + XACK consumer, same publisher",
            rate / base_rate,
            "report",
            None,
        ),
        reported(scenario, "anomaly events", events, "events"),
        _cpu_row(scenario, ours.cpu_seconds, base.cpu_seconds),
        reported(scenario, "Redis server CPU during the drain", redis_used, "s"),
        reported(scenario, f"bulk fit of the {n:,} series beforehand", seconds, "s"),
    ]


def _cpu_row(scenario: str, ours: float, base: float) -> Row:
    """The worker's CPU seconds over a drain against the no-op consumer's."""
    return Row(
        scenario, "worker CPU", ours, "s", base, "no-op consumer CPU", ours / base, "report", None
    )
