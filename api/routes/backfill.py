"""Backfill over REST: a series' history scored through the stream pipeline
(``detector.backfill``), apart from the live stream."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query

from api.bodies import ArrayBody, batch_body, checked_points
from api.deps import SeriesIdDep, ServicesDep, find_model
from api.schemas import (
    UNSUPPORTED_MEDIA_TYPE,
    BackfillResponse,
    BatchPredictRequest,
    body_schema,
)
from detector.backfill import JOB_ID, MAX_INDEX, Backfill
from detector.wire.events import decode_event

router = APIRouter(tags=["backfill"])


@router.post(
    "/backfill/{series_id}",
    response_model=BackfillResponse,
    openapi_extra=body_schema(BatchPredictRequest, arrow_options=False),
    responses=UNSUPPORTED_MEDIA_TYPE,
    summary="Score a series' history through the stream pipeline, apart from the live stream",
)
async def backfill(
    series_id: SeriesIdDep,
    body: Annotated[ArrayBody, Depends(batch_body)],
    services: ServicesDep,
    job: Annotated[
        str | None,
        Query(
            pattern=JOB_ID.pattern,
            description="Continue this job (its states and episodes); default: a new job.",
        ),
    ] = None,
    start: Annotated[
        int,
        Query(
            ge=0,
            lt=MAX_INDEX,
            description="The index of the first reading in the job (`next_start`; below 2**53).",
        ),
    ] = 0,
) -> BackfillResponse:
    """The readings (timestamps and values, in the order the series produced them) are scored
    as the stream workers would score them streamed in that order: the same kinds, states,
    episodes and event fields. Events go to `STREAM_BACKFILL` and the anomaly history (as
    `source=backfill`); live states, episodes and alerts are not touched. A long history is
    sent in requests of up to `MAX_BATCH_POINTS` readings with the same `job`, each `start` the
    previous answer's `next_start`."""
    limit = services.settings.max_batch_points
    timestamps, values = checked_points(
        body,
        limit,
        lambda n: (
            f"a backfill request takes at most {limit} readings (got {n}); send the rest"
            " with the same job and start = next_start"
        ),
    )
    n = len(values)
    await find_model(services.store, series_id, None)  # a 404 names an unknown series
    job_run = Backfill(services.settings, services.store, job)
    result = await job_run.score([series_id] * n, timestamps, values, start=start)
    return BackfillResponse(
        job=result.job,
        series_id=series_id,
        start=start,
        next_start=result.next_index,
        scored=result.scored,
        anomalies=len(result.events),
        episodes_opened=result.episodes_opened,
        stream=services.settings.stream_backfill,
        events=[decode_event(e) for e in result.events],
    )
