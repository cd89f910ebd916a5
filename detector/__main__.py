"""Run one stream worker: ``python -m detector`` (or the ``anomaly-detector`` script)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal

from prometheus_client import CollectorRegistry, start_http_server

from detector.errors import POSTGRES_ERRORS
from detector.metrics import WorkerMetrics
from detector.settings import Settings
from detector.store.connections import apply_schema, postgres_pool, redis_client
from detector.store.retention import start_retention
from detector.transports.redis.worker import Worker

log = logging.getLogger("detector")


async def serve(settings: Settings, *, burst: bool, consumer: str | None) -> None:
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry)
    if settings.metrics_port:
        start_http_server(settings.metrics_port, registry=registry)
        log.info("worker metrics on http://0.0.0.0:%d/metrics", settings.metrics_port)
    redis = redis_client(settings)
    pool = postgres_pool(settings)
    await pool.open(wait=False)
    try:
        try:
            await apply_schema(pool)
        except POSTGRES_ERRORS as exc:
            # Keep going: scoring needs Redis only; anomalies wait for PostgreSQL (retried).
            log.warning("PostgreSQL not reachable at start-up: %s", exc)
        worker = Worker(settings, redis, pool, metrics=metrics, consumer=consumer)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.request_stop)
        retention = None if burst else start_retention(pool, settings)
        try:
            await worker.run(burst=burst)
        finally:
            if retention is not None:
                retention.cancel()
            await worker.store.publisher.close()
    finally:
        await pool.close()
        await redis.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--burst", action="store_true", help="exit once the stream is drained (nothing pending)"
    )
    parser.add_argument("--consumer", help="consumer name in the group (default: host-pid)")
    parser.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "info"))
    args = parser.parse_args()
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    asyncio.run(serve(Settings(), burst=args.burst, consumer=args.consumer))


if __name__ == "__main__":
    main()
