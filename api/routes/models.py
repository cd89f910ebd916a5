"""Fitting, predicting and listing models."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Annotated
from urllib.parse import urlencode

import numpy as np
import orjson
from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response, params
from starlette.concurrency import run_in_threadpool

from api.bodies import ArrayBody, BulkBody, batch_body, bulk_fit_body, checked_points, fit_body
from api.deps import (
    SeriesIdDep,
    Services,
    ServicesDep,
    VersionDep,
    find_model,
    parse_json_body,
    series_and_version_parameters,
    version_query_value,
)
from api.errors import classify
from api.schemas import (
    ARROW_MEDIA_TYPE,
    ERROR_RESPONSES,
    UNSUPPORTED_MEDIA_TYPE,
    BatchPredictRequest,
    BatchPredictResponse,
    BulkFitRequest,
    BulkFitResponse,
    FitRequest,
    FitResponse,
    PredictRequest,
    PredictResponse,
    SeriesModels,
    SeriesPage,
    VersionInfo,
    body_schema,
)
from detector.bulk_fit import BatchOutcome, BulkFit
from detector.errors import AnomalyError, InvalidInputError
from detector.fitting import fit_version
from detector.identifiers import (
    SERIES_ID_SCHEMA,
    format_version,
    validate_series_id,
)
from detector.kinds.base import severity
from detector.kinds.training import MAX_TIMESTAMP, FloatArray
from detector.store.codec import ModelVersion

router = APIRouter(tags=["models"])  # reads: batch, models (predict: add_predict_route)
write_router = APIRouter(tags=["models"])  # fits

# Batches at least this long are scored in a worker thread, off the event loop.
_THREAD_SCORE_POINTS = 50_000


def _json(payload: object, status_code: int = 200) -> Response:
    return Response(
        orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY),
        status_code=status_code,
        media_type="application/json",
    )


@write_router.post(
    "/fit/{series_id}",
    response_model=FitResponse,
    openapi_extra=body_schema(FitRequest, arrow_options=True),
    responses=UNSUPPORTED_MEDIA_TYPE,
    summary="Fit a new model version of a series",
)
async def fit(
    series_id: SeriesIdDep,
    body: Annotated[ArrayBody, Depends(fit_body)],
    services: ServicesDep,
) -> Response:
    metrics = services.metrics
    start = time.perf_counter()
    try:
        stored = await fit_version(
            services.store,
            services.settings,
            series_id,
            body.timestamps,
            body.values,
            sigma=body.sigma,
            direction=body.direction,
            kind=body.kind,
        )
    except AnomalyError as exc:
        metrics.train_requests.labels(classify(exc)[1]).inc()
        raise
    elapsed = time.perf_counter() - start
    metrics.train_requests.labels("ok").inc()
    metrics.train_duration.observe(elapsed)
    services.training_latency.record(elapsed)
    return _json(_fit_answer(stored))


def _fit_answer(stored: ModelVersion) -> dict[str, object]:
    """A stored version as a fit answers it (``FitResponse``), alone or in a bulk fit."""
    model = stored.model
    return {
        "series_id": stored.series_id,
        "version": stored.name,
        "points_used": stored.points_used,
        "mean": model.mean,
        "std": model.std,
        "sigma": model.sigma,
        "direction": model.direction,
        "lower": model.lower,
        "upper": model.upper,
        "kind": model.kind,
    }


def _bulk_body_schema() -> dict[str, object]:
    extra = body_schema(BulkFitRequest, arrow_options=True)
    extra["requestBody"]["description"] = (
        "JSON (the default, also when no content type is given), or "
        f"`{ARROW_MEDIA_TYPE}`: an Apache Arrow IPC stream, uncompressed, of record batches "
        "with the columns `series_id` (string), `timestamp` (int64, or float64 Unix seconds) "
        "and `value` (float64), one row a point, the series' rows in any order; its options "
        "`sigma`, `direction` and `kind` are query parameters. At most MAX_BULK_FIT_POINTS "
        "points in all (413 beyond). Any other content type is a 415."
    )
    return extra


@write_router.post(
    "/fit",
    response_model=BulkFitResponse,
    openapi_extra=_bulk_body_schema(),
    responses=UNSUPPORTED_MEDIA_TYPE,
    summary="Fit new model versions of many series in one job",
)
async def bulk_fit(
    body: Annotated[BulkBody, Depends(bulk_fit_body)], services: ServicesDep
) -> Response:
    """Every series gets a new version under the rules of `POST /fit/{series_id}`, stored in
    batches (one transaction and one Redis round trip a thousand series). A series whose id or
    points break a rule is refused with the single fit's message and the others go on; a
    series is stored whole or not at all. The job is one MLflow run (not one a version)."""
    metrics = services.metrics
    fitted: list[dict[str, object]] = []
    refused: list[dict[str, object]] = []

    def take(outcome: BatchOutcome) -> None:
        fitted.extend(_fit_answer(stored) for stored in outcome.stored)
        for refusal in outcome.refused:
            status, label = classify(refusal.error)
            metrics.train_requests.labels(label).inc()
            refused.append(
                {"series_id": refusal.series_id, "status": status, "detail": refusal.detail}
            )

    job = BulkFit(
        services.store,
        services.settings,
        source="rest",
        sigma=body.sigma,
        direction=body.direction,
        kind=body.kind,
    )
    try:
        summary = await job.run(body.series, take)
    except AnomalyError as exc:
        metrics.train_requests.labels(classify(exc)[1]).inc()
        raise
    metrics.train_requests.labels("ok").inc(summary.fitted)
    if summary.fitted:
        metrics.train_duration.observe(summary.seconds / summary.fitted)
    return _json(
        {"job": summary.job, "fitted": fitted, "refused": refused, "seconds": summary.seconds}
    )


async def predict(request: Request) -> Response:
    # POST /predict/{series_id} (``add_predict_route``), the hot path. It reads its path, query
    # and body itself: FastAPI's resolution of declared parameters and dependencies costs more
    # than the prediction. The checks and their order are those of the declared form (OpenAPI
    # declares the same parameters): the body (422 under ``body``), then the id, the version
    # and the timestamp.
    body = await parse_json_body(PredictRequest, await request.body())
    services: Services = request.app.state.services
    series_id = validate_series_id(request.path_params["series_id"])
    requested = version_query_value(
        request.query_params.get("version") if request.scope["query_string"] else None
    )
    _check_timestamp(body.timestamp)
    metrics = services.metrics
    start = time.perf_counter()
    try:
        found = await find_model(services.store, series_id, requested)
    except AnomalyError as exc:
        metrics.predict_requests.labels(classify(exc)[1]).inc()
        raise
    # Every kind answers with its version's stateless μ ± kσ rule (for the multiscale kind, its
    # training data's μ and σ): one call has no stream context, and it never reads or changes
    # the series' streaming state.
    anomaly = found.model.is_anomaly(body.value)
    elapsed = time.perf_counter() - start
    metrics.predict_ok.inc()
    metrics.predict_single_duration.observe(elapsed)
    metrics.predicted_points.inc()
    if anomaly:
        metrics.rest_anomalies.inc()
    services.inference_latency.record(elapsed)
    return Response(
        orjson.dumps({"anomaly": anomaly, "model_version": found.name}),
        media_type="application/json",
    )


def add_predict_route(app: FastAPI, dependencies: Sequence[params.Depends]) -> None:
    """Declare ``POST /predict/{series_id}`` on the app itself: FastAPI matches a route of an
    included router through that router, twice a request; one declared on the app is matched
    once, directly."""
    app.add_api_route(
        "/predict/{series_id}",
        predict,
        methods=["POST"],
        response_model=PredictResponse,
        openapi_extra={
            **body_schema(PredictRequest),
            "parameters": series_and_version_parameters(),
        },
        summary="Is this reading anomalous?",
        tags=["models"],
        dependencies=dependencies,
        responses=ERROR_RESPONSES,
    )


def _check_timestamp(timestamp: int | float | str) -> int:
    """Predict timestamps: an integer, an integral JSON number, or a string of digits."""
    if isinstance(timestamp, float) and not timestamp.is_integer():
        raise InvalidInputError("timestamp must be a non-negative integer (Unix seconds)")
    value = int(timestamp)
    if value < 0 or value > MAX_TIMESTAMP:
        raise InvalidInputError("timestamp must be a non-negative integer (Unix seconds)")
    return value


@router.post(
    "/predict/{series_id}/batch",
    response_model=BatchPredictResponse,
    openapi_extra=body_schema(BatchPredictRequest, arrow_options=False),
    responses=UNSUPPORTED_MEDIA_TYPE,
    summary="Score many readings of one series in one call",
)
async def predict_batch(
    series_id: SeriesIdDep,
    version: VersionDep,
    body: Annotated[ArrayBody, Depends(batch_body)],
    services: ServicesDep,
) -> Response:
    metrics = services.metrics
    limit = services.settings.max_batch_points
    checked_points(body, limit, lambda n: f"a batch takes at most {limit} points (got {n})")
    n = len(body.values)
    start = time.perf_counter()
    try:
        found = await find_model(services.store, series_id, version)
    except AnomalyError as exc:
        metrics.predict_requests.labels(classify(exc)[1]).inc()
        raise
    if n >= _THREAD_SCORE_POINTS:
        payload = await run_in_threadpool(_batch_payload, found, body.values)
    else:
        payload = _batch_payload(found, body.values)
    elapsed = time.perf_counter() - start
    metrics.predict_requests.labels("ok").inc()
    metrics.predict_duration.labels("batch").observe(elapsed)
    metrics.predicted_points.inc(n)
    metrics.anomalies.labels("rest").inc(int(payload["anomalies"]))  # type: ignore[call-overload]
    return _json(payload)


def _batch_payload(found: ModelVersion, values: FloatArray) -> dict[str, object]:
    model = found.model
    scores = model.score(np.asarray(values, dtype=np.float64))
    return {
        "series_id": found.series_id,
        "model_version": found.name,
        "mean": found.model.mean,
        "std": found.model.std,
        "sigma": found.model.sigma,
        "direction": found.model.direction,
        "lower": found.model.lower,
        "upper": found.model.upper,
        "expected": model.mean,
        "test": "threshold",
        "anomalies": int(scores.anomaly.sum()),
        "anomaly": scores.anomaly,
        "score": scores.score,
        "severity": np.round(severity(np.abs(scores.score) / model.sigma), 1),
    }


@router.get(
    "/models/{series_id}",
    response_model=SeriesModels,
    summary="Every version of a series",
)
async def series_models(series_id: SeriesIdDep, services: ServicesDep) -> SeriesModels:
    versions = await services.store.versions(series_id)
    return SeriesModels(
        series_id=series_id,
        versions=[
            VersionInfo(
                version=v.name,
                mean=v.model.mean,
                std=v.model.std,
                sigma=v.model.sigma,
                direction=v.model.direction,
                points_used=v.points_used,
                created_at=v.created_at.isoformat(),
                mlflow_run_id=v.mlflow_run_id,
                kind=v.model.kind,
            )
            for v in versions
        ],
    )


@router.get(
    "/models",
    response_model=SeriesPage,
    summary="Series with models, by id (paged)",
)
async def list_models(
    request: Request,
    services: ServicesDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    after: Annotated[
        str | None,
        Query(
            description="the last series_id of the previous page",
            json_schema_extra=SERIES_ID_SCHEMA,
        ),
    ] = None,
) -> SeriesPage:
    if after is not None:
        validate_series_id(after)
    rows = await services.store.list_series(limit=limit + 1, after=after)
    page, more = rows[:limit], len(rows) > limit
    next_url = None
    if more:
        next_url = str(request.url.replace(query=urlencode({"limit": limit, "after": page[-1][0]})))
    return SeriesPage(
        items=[
            {"series_id": sid, "latest_version": format_version(v), "versions": v, "kind": kind}
            for sid, v, kind in page
        ],
        next=next_url,
    )
