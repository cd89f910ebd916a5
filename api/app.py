"""The FastAPI application factory; clients are opened and closed in the lifespan."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from api.auth import ReadAccess, WriteAccess
from api.bodies import THREAD_PARSE_BYTES
from api.deps import Services
from api.errors import install_error_handlers
from api.event_feed import EventFeed
from api.latency import LatencyWindow
from api.metrics import ApiMetrics
from api.middleware import BodyGuard, HttpMetrics
from api.plot_cache import PlotCache
from api.pointer_cache import LatestPointerCache
from api.routes import backfill, events, feedback, incidents, models, system
from api.schemas import ERROR_RESPONSES, declare_limits
from detector.errors import POSTGRES_ERRORS
from detector.mlflow_outbox import MlflowTracker
from detector.settings import Settings, get_settings
from detector.shards import anomalies_streams
from detector.store.connections import apply_schema, is_cluster, postgres_pool, redis_client
from detector.store.models import ModelStore
from detector.store.replication import ReplicaWait
from detector.store.retention import start_retention

log = logging.getLogger(__name__)

DESCRIPTION = """
Real-time anomaly detection for time series. Fit a model per series (mean μ and standard
deviation σ of the training values), then ask whether a reading is anomalous: by default when
it is above μ + 3σ. Every fit makes a new immutable version (`v1.0.0`, `v2.0.0`, …).
"""


def create_app(
    settings: Settings | None = None, *, registry: CollectorRegistry | None = None
) -> FastAPI:
    """Build the app. Tests pass their own settings and a fresh metrics registry."""
    settings = settings or get_settings()
    metrics = ApiMetrics(registry if registry is not None else CollectorRegistry())
    plots = PlotCache(settings.plot_cache_size, settings.plot_max_points, metrics.registry)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        redis = redis_client(settings)
        pool = postgres_pool(settings)
        await pool.open(wait=False)
        try:
            await apply_schema(pool)
        except POSTGRES_ERRORS as exc:
            # Start anyway: /healthcheck reports it, and the schema is applied by whoever
            # reaches PostgreSQL first (make run and the worker apply it too).
            log.warning("PostgreSQL not reachable at start-up: %s", exc)
        store = ModelStore(
            redis,
            pool,
            cache_size=settings.model_cache_size,
            replica_wait=ReplicaWait.from_settings(settings),
        )
        events = EventFeed(
            reader=redis_client(settings),
            redis=redis,
            streams=anomalies_streams(settings),
            max_clients=settings.sse_max_clients,
            queue_size=settings.sse_queue_events,
        )
        pointers = None
        if settings.latest_pointer_tracking and is_cluster(redis):
            # Key tracking is per connection, and a connection sees one node's keys: the
            # cache would need one per master, following every failover and moved slot.
            # Predictions read the pointer from Redis instead (docs/operations.md).
            log.info("Redis Cluster: latest-version pointers are read from Redis every time")
        elif settings.latest_pointer_tracking:
            pointers = LatestPointerCache(settings.redis_connection_url())
            await pointers.start()
            store.pointers = pointers
        app.state.services = Services(
            settings=settings,
            store=store,
            metrics=metrics,
            inference_latency=LatencyWindow(settings.latency_window),
            training_latency=LatencyWindow(settings.latency_window),
            events=events,
            plots=plots,
        )
        # MLflow runs are logged from the outbox in the background, never on the request path.
        tracker = MlflowTracker.from_settings(settings, pool, metrics.registry)
        if tracker is not None:
            tracker.start()
        retention = start_retention(pool, settings)
        try:
            yield
        finally:
            if retention is not None:
                retention.cancel()
            await store.publisher.close()
            if tracker is not None:
                await tracker.stop()
            await events.close()
            if pointers is not None:
                await pointers.stop()
            await pool.close()
            await redis.aclose()

    app = FastAPI(
        title="Anomaly detector",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    install_error_handlers(app, metrics)
    # Access checks are attached only when keys are configured: with keys off (the default)
    # the hot path carries no authentication dependencies at all.
    keys_on = bool(settings.api_keys or settings.api_read_keys)
    read = [ReadAccess] if keys_on else []
    write = [WriteAccess] if keys_on else []
    models.add_predict_route(app, read)
    app.include_router(models.write_router, dependencies=write, responses=ERROR_RESPONSES)
    app.include_router(models.router, dependencies=read, responses=ERROR_RESPONSES)
    app.include_router(backfill.router, dependencies=write, responses=ERROR_RESPONSES)
    app.include_router(feedback.router, dependencies=write, responses=ERROR_RESPONSES)
    app.include_router(feedback.read_router, dependencies=read, responses=ERROR_RESPONSES)
    app.include_router(system.read_router, dependencies=read, responses=ERROR_RESPONSES)
    app.include_router(events.router, dependencies=read, responses=ERROR_RESPONSES)
    app.include_router(incidents.router, dependencies=read, responses=ERROR_RESPONSES)
    app.include_router(system.router, responses=ERROR_RESPONSES)
    # The last added runs first: body limits act before anything reads the body.
    app.add_middleware(HttpMetrics, metrics=metrics)
    app.add_middleware(
        BodyGuard,
        max_bytes=settings.max_body_bytes,
        budget_bytes=settings.body_budget_bytes,
        wait_seconds=settings.body_budget_wait_seconds,
        free_bytes=THREAD_PARSE_BYTES,
    )
    plain_openapi = app.openapi
    app.openapi = lambda: declare_limits(plain_openapi(), settings)  # type: ignore[method-assign]
    return app
