"""Run one stream worker: ``python -m detector`` (or the ``anomaly-detector`` script)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import sys
from dataclasses import asdict

from prometheus_client import CollectorRegistry, start_http_server

from detector.collector import tune_collector
from detector.errors import POSTGRES_ERRORS, REDIS_ERRORS, NotOnClusterError
from detector.metrics import WorkerMetrics
from detector.settings import Settings
from detector.store.connections import (
    apply_schema,
    postgres_pool,
    redis_client,
    refuse_unsharded_cluster,
)
from detector.store.retention import start_retention
from detector.transports.redis.health import read_health
from detector.transports.redis.worker import run_workers, workers

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
        group = workers(settings, redis, pool, metrics=metrics, consumer=consumer)
        loop = asyncio.get_running_loop()

        def stop() -> None:
            for worker in group:
                worker.request_stop()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop)
        retention = None if burst else start_retention(pool, settings)
        try:
            await run_workers(group, burst=burst)
        finally:
            if retention is not None:
                retention.cancel()
            await group[0].store.publisher.close()
    finally:
        await pool.close()
        await redis.aclose()


async def check(settings: Settings, consumer: str | None) -> int:
    """Print the live workers as JSON lines; 0 if ``consumer`` (else any worker of this host)
    has a live heartbeat, 1 if not, 2 if Redis cannot be asked."""
    redis = redis_client(settings)
    try:
        live = await read_health(redis, settings.stream_readings)
    except REDIS_ERRORS as exc:
        print(json.dumps({"error": f"Redis unavailable: {exc}"}))
        return 2
    finally:
        await redis.aclose()
    for h in live:
        print(json.dumps({**asdict(h), "age_seconds": round(h.age, 3)}))
    host = socket.gethostname() + "-"
    ours = [
        h for h in live if (h.consumer == consumer if consumer else h.consumer.startswith(host))
    ]
    return 0 if ours else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--burst", action="store_true", help="exit once the stream is drained (nothing pending)"
    )
    parser.add_argument("--consumer", help="consumer name in the group (default: host-pid)")
    parser.add_argument(
        "--check",
        action="store_true",
        help="print the live workers and exit 0 if this one (--consumer, else any worker of "
        "this host) has a fresh heartbeat, else 1",
    )
    parser.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "info"))
    args = parser.parse_args()
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings = Settings()
    try:
        refuse_unsharded_cluster(settings)
    except NotOnClusterError as exc:
        sys.exit(exc.detail)
    if args.check:
        sys.exit(asyncio.run(check(settings, args.consumer)))
    tune_collector()
    asyncio.run(serve(settings, burst=args.burst, consumer=args.consumer))


if __name__ == "__main__":
    main()
