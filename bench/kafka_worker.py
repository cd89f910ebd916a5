"""Readings/s of one faust worker against a no-op aiokafka consumer of the same topic, in the
same run: ``python -m bench.kafka_worker [N]`` (tansu, N readings published first)."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.harness import ROOT, api_process, embedded_servers
from embedded.processes import free_port
from tests.integration.test_kafka import publish
from tests.integration.test_worker import fit_series, make_readings
from tests.support.kafka import KafkaNames, KafkaWorker, create_topics, start_tansu


def main(count: int) -> None:
    with (
        tempfile.TemporaryDirectory(prefix="bench-kafka-") as tmp,
        embedded_servers(Path(tmp), durable=False) as servers,
        api_process(servers.settings, ["-m", "api", "--log-level", "warning"]) as api,
    ):
        settings = servers.settings
        port = free_port()
        broker = start_tansu(port)
        bootstrap = f"127.0.0.1:{port}"
        try:
            with httpx.Client(base_url=api.url, timeout=60) as client:
                series = fit_series(client, 100)
            rows, anomalous = make_readings(series, count)
            names = KafkaNames.fresh()
            create_topics(bootstrap, names)
            publish(bootstrap, names.readings, rows)
            noop_args = ["--bootstrap", bootstrap, "--topic", names.readings]
            noop_args += ["--group", f"noop-{names.app_id}", "--count", str(count)]
            noop = subprocess.run(
                [sys.executable, "-m", "bench.kafka_noop", *noop_args],
                capture_output=True,
                check=True,
                cwd=ROOT,
            )
            base = json.loads(noop.stdout)
            worker = KafkaWorker(settings, bootstrap, names)
            try:
                while worker.scored() == 0:
                    time.sleep(0.01)
                started, first = time.monotonic(), worker.scored()
                while worker.scored() < count:
                    time.sleep(0.05)
                elapsed = time.monotonic() - started
                busy = worker.sample("stream_batch_duration_seconds_sum", transport="kafka") or 0.0
                batches = worker.sample("stream_batch_duration_seconds_count", transport="kafka")
            finally:
                worker.stop()
        finally:
            broker.terminate()
        done = count - first
        rate, base_rate = done / elapsed, base["entries"] / base["seconds"]
        print(
            f"one faust worker: {done:,.0f} readings in {elapsed:.2f} s = {rate:,.0f} "
            f"readings/s ({len(anomalous)} anomalies; scoring and producing {busy:.2f} s of it, "
            f"in {batches or 0:,.0f} batches)"
        )
        print(
            f"no-op aiokafka consumer, same topic: {base['entries']:,.0f} records in "
            f"{base['seconds']:.2f} s = {base_rate:,.0f} records/s"
        )
        print(f"ratio: {rate / base_rate:.2f}× (target ≥ 0.5×)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000)
