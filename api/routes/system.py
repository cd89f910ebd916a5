"""Health, metrics and the plot."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Query, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from api.deps import SeriesIdQueryDep, ServicesDep, VersionDep, find_model
from api.plotting import render_plot
from api.schemas import ErrorBody, Health
from detector.errors import POSTGRES_ERRORS, StoreUnavailableError
from detector.store.history import query_anomalies

router = APIRouter()  # open: health and metrics
read_router = APIRouter()  # behind read keys when keys are set


@router.get(
    "/healthcheck",
    response_model=Health,
    tags=["operations"],
)
async def healthcheck(services: ServicesDep) -> JSONResponse:
    store, metrics = services.store, services.metrics
    redis_error, postgres_error = await asyncio.gather(store.ping_redis(), store.ping_postgres())
    dependencies = {"redis": redis_error or "ok", "postgres": postgres_error or "ok"}
    metrics.dependency_up.labels("redis").set(redis_error is None)
    metrics.dependency_up.labels("postgres").set(postgres_error is None)
    if redis_error or postgres_error:
        down = [name for name, state in dependencies.items() if state != "ok"]
        return JSONResponse(
            {
                "detail": f"unavailable: {', '.join(down)}",
                "dependencies": dependencies,
            },
            status_code=503,
        )
    series, versions = await asyncio.gather(store.count_series(), store.count_versions())
    metrics.series_stored.set(series)
    metrics.models_stored.set(versions)
    return JSONResponse(
        {
            "series_trained": series,
            "inference_latency_ms": services.inference_latency.summary(),
            "training_latency_ms": services.training_latency.summary(),
            "dependencies": dependencies,
        }
    )


@router.get(
    "/metrics",
    tags=["operations"],
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
async def metrics(services: ServicesDep) -> Response:
    return Response(generate_latest(services.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@read_router.get(
    "/plot",
    tags=["models"],
    summary="PNG of a version's training data, μ and the μ ± kσ band",
    response_class=Response,
    responses={
        200: {"content": {"image/png": {}}},
        410: {
            "model": ErrorBody,
            "description": "The version's training points were deleted by retention",
        },
    },
)
async def plot(
    series_id: SeriesIdQueryDep,
    version: VersionDep,
    services: ServicesDep,
    anomalies: Annotated[
        bool, Query(description="Overlay the anomalies recorded from the stream (history).")
    ] = False,
) -> Response:
    found = await find_model(services.store, series_id, version)
    points = await services.plots.points(services.store, found)
    detected: list[dict[str, Any]] = []
    if anomalies:
        try:
            detected = await query_anomalies(services.store.pool, series_id, limit=10_000)
        except POSTGRES_ERRORS as exc:
            raise StoreUnavailableError("postgres", f"PostgreSQL is unavailable: {exc}") from exc
    png = await run_in_threadpool(render_plot, found, points, detected=detected)
    return Response(png, media_type="image/png")
