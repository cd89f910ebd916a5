"""Readings/s of one faust worker: ``python -m bench.kafka_worker [N]`` (tansu, N pre-published)."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import httpx
from tests.kafka_helpers import KafkaNames, KafkaWorker, create_topics, start_tansu
from tests.test_kafka import publish
from tests.test_worker import fit_series, make_readings

from detector.settings import Settings
from detector.store.connections import apply_schema_sync
from embedded.servers import PostgresServer, RedisServer, free_port
from tests.conftest import start_api


def main(count: int) -> None:
    tmp = Path(tempfile.mkdtemp())
    redis = RedisServer(tmp / "redis", free_port())
    redis.start()
    postgres = PostgresServer(tmp / "pg", free_port(), durable=False)
    postgres.start()
    apply_schema_sync(postgres.conninfo())
    settings = Settings(**redis.settings_fields(), **postgres.settings_fields())
    port = free_port()
    broker = start_tansu(port)
    bootstrap = f"127.0.0.1:{port}"
    api, url = start_api(settings)
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            series = fit_series(client, 100)
        rows, anomalous = make_readings(series, count)
        names = KafkaNames.fresh()
        create_topics(bootstrap, names)
        publish(bootstrap, names.readings, rows)
        worker = KafkaWorker(settings, bootstrap, names)
        try:
            while worker.scored() == 0:
                time.sleep(0.01)
            started, first = time.monotonic(), worker.scored()
            while worker.scored() < count:
                time.sleep(0.05)
            elapsed = time.monotonic() - started
            busy = worker.sample("stream_batch_duration_seconds_sum", transport="kafka") or 0.0
        finally:
            worker.stop()
        done = count - first
        print(
            f"one faust worker: {done:,.0f} readings in {elapsed:.2f} s = {done / elapsed:,.0f} "
            f"readings/s ({len(anomalous)} anomalies; scoring and producing {busy:.2f} s of it)"
        )
    finally:
        api.terminate()
        api.wait(30)
        broker.terminate()
        postgres.stop()
        redis.stop()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000)
