"""The Kafka scenario: one faust worker (``python -m detector.transports.kafka worker``, as the
compose file runs it) against a no-op aiokafka consumer of the same topic, on a tansu broker
started here; the realistic mix of the Redis stream scenario, published first."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from collections import Counter

from bench.context import Context
from bench.harness import ROOT
from bench.report import Row, reported
from bench.streams import STREAM_SERIES, realistic_mix, stream_count, stream_models
from detector.settings import Settings
from embedded.processes import free_port
from ingest.kafka import KafkaPublisher
from tests.support.kafka import KafkaNames, KafkaWorker, create_topics, read_topic, start_tansu

log = logging.getLogger("bench")


def scenario_kafka(ctx: Context) -> list[Row]:
    """Static models, then the default kind's, each over its own topics and group."""
    count = min(stream_count(ctx), 200_000)  # tansu keeps every record in memory
    port = free_port()
    broker = start_tansu(port)
    bootstrap = f"127.0.0.1:{port}"
    try:
        rows = _kafka_rows(ctx, bootstrap, "static", count)
        default = str(Settings.model_fields["default_kind"].default)
        if default != "static":
            rows += _kafka_rows(ctx, bootstrap, default, count)
    finally:
        broker.terminate()
        broker.wait(30)
    return rows


def _kafka_rows(ctx: Context, bootstrap: str, kind: str, count: int) -> list[Row]:
    ids = stream_models(ctx, kind)
    series, timestamps, values, expected = realistic_mix(count, STREAM_SERIES)
    names = KafkaNames.fresh()
    create_topics(bootstrap, names)
    with KafkaPublisher(f"kafka://{bootstrap}", topic=names.readings, batch_size=10_000) as pub:
        for s, t, v in zip(series.tolist(), timestamps.tolist(), values.tolist(), strict=True):
            pub.publish(ids[s], t, v)
    base = _baseline("bench.kafka_noop", bootstrap, names.readings, f"noop-{names.app_id}", count)
    agent = _baseline("bench.faust_noop", bootstrap, names.readings, f"faust-{names.app_id}", count)
    worker = KafkaWorker(ctx.settings, bootstrap, names)
    try:
        while not worker.scored():
            if worker.proc.poll() is not None:
                raise RuntimeError(f"the Kafka worker exited with {worker.proc.returncode}")
            time.sleep(0.01)
        started, first = time.monotonic(), worker.scored()
        while worker.scored() < count:
            time.sleep(0.05)
        elapsed = time.monotonic() - started
        busy = worker.sample("stream_batch_duration_seconds_sum", transport="kafka") or 0.0
    finally:
        worker.stop()
    # Other event types (``no_data`` of series the silence watch finds silent, incidents)
    # are the worker's to emit beside the anomalies: counted apart, never as anomalies.
    records = read_topic(bootstrap, names.anomalies)
    types = Counter(value.get("type", "anomaly") for *_, value in records)
    events = types.pop("anomaly", 0)
    if events != expected:
        raise RuntimeError(
            f"{kind} on Kafka: {events} anomaly records, expected {expected}"
            f" (other events: {dict(types)})"
        )
    if types:
        log.info("%s on Kafka: other events beside the anomalies: %s", kind, dict(types))
    done = count - first
    rate, base_rate = done / elapsed, base["entries"] / base["seconds"]
    agent_rate = agent["entries"] / agent["seconds"]
    scenario = (
        f"Kafka ({kind}): {count:,} readings, {STREAM_SERIES:,} series, {expected:,} anomalies "
        "(1 %), published first"
    )
    return [
        Row(
            scenario,
            "throughput",
            rate,
            "readings/s",
            base_rate,
            "no-op aiokafka consumer (getmany + commit), same topic",
            rate / base_rate,
            "≥ 0.5×",
            rate / base_rate >= 0.5,
        ),
        Row(
            scenario,
            "throughput against a no-op faust agent",
            rate,
            "readings/s",
            agent_rate,
            "no-op faust agent (take_events batches), same topic",
            rate / agent_rate,
            "report",
            None,
        ),
        reported(scenario, "scoring and producing, of the drain", busy / elapsed, "share"),
    ]


def _baseline(module: str, bootstrap: str, topic: str, group: str, count: int) -> dict[str, float]:
    """``{"entries", "seconds"}`` of a no-op consumer module run over the topic."""
    args = ["--bootstrap", bootstrap, "--topic", topic, "--group", group, "--count", str(count)]
    done = subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        check=True,
        cwd=ROOT,
        timeout=600,
    )
    # faust prints its banner on stdout too: the figure is the line that is a JSON object.
    lines = [ln for ln in done.stdout.decode().splitlines() if ln.startswith('{"entries"')]
    result: dict[str, float] = json.loads(lines[-1])
    return result
