"""Feedback on detections: an episode judged a false or true positive, a range marked missed.

Stored in PostgreSQL (``detector.store.feedback``); the series' threshold adjustment
(``detector.feedback``) is written to Redis, where every worker finds it within
``MODEL_REFRESH_SECONDS``, and each row is recorded on the MLflow run of the version it is
about (drained with the fits' outbox, so MLflow being down delays it and loses nothing).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from api.deps import SeriesIdDep, ServicesDep, find_model, json_body
from api.schemas import body_schema
from detector.errors import InvalidInputError
from detector.feedback import Adjustment
from detector.identifiers import SERIES_ID_SCHEMA, validate_series_id
from detector.kinds.training import MAX_TIMESTAMP
from detector.store.feedback import (
    find_episode,
    list_feedback,
    public,
    publish_adjustment,
    record_feedback,
    series_adjustment,
)

router = APIRouter(tags=["feedback"])
read_router = APIRouter(tags=["feedback"])

# An episode id is its opener's source id: a `readings` entry id (`1700000000000-0`) or a
# Kafka record's `topic/partition/offset`.
EPISODE_ID = re.compile(r"^[!-~]{1,512}$")


def _json_number(value: object) -> object:
    """A JSON number, as a fit's timestamps are: booleans and strings are refused (pydantic's
    lax integers would take ``false`` as 0 and ``"61"`` as 61)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("a timestamp is a JSON number (Unix seconds)")
    return value


# An integral JSON number (1.0) is the integer 1, as in a fit's body (and JSON Schema).
Timestamp = Annotated[int, Field(ge=0, le=MAX_TIMESTAMP), BeforeValidator(_json_number)]
Note = Annotated[str, Field(max_length=2000)]


class EpisodeFeedback(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    label: Literal["false_positive", "true_positive", "missed"] = Field(
        description="false_positive or true_positive (missed ranges: POST /series/{id}/feedback)"
    )
    series_id: str | None = Field(
        default=None,
        description="The episode's series, if several series have an episode of that id.",
    )
    from_: Timestamp | None = Field(default=None, alias="from", description="Not taken here.")
    to: Timestamp | None = Field(default=None, description="Not taken here.")
    note: Note | None = None


class MissedFeedback(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    label: Literal["false_positive", "true_positive", "missed"] = Field(
        default="missed", description="missed (false and true positives judge an episode)"
    )
    from_: Timestamp | None = Field(
        default=None, alias="from", description="First reading timestamp of the missed range."
    )
    to: Timestamp | None = Field(default=None, description="Last reading timestamp, inclusive.")
    note: Note | None = None


# What the routes document (OpenAPI): the bodies they accept. They parse with the models
# above, which take any label and say, for the wrong one, which route takes it.
class EpisodeFeedbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    label: Literal["false_positive", "true_positive"]
    series_id: str | None = Field(default=None, json_schema_extra=dict(SERIES_ID_SCHEMA))  # type: ignore[arg-type]
    note: Note | None = None


class MissedFeedbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    label: Literal["missed"] = "missed"
    from_: Timestamp = Field(alias="from", description="First reading timestamp (≤ to).")
    to: Timestamp = Field(description="Last reading timestamp, inclusive.")
    note: Note | None = None


class FeedbackAnswer(BaseModel):
    id: int
    series_id: str
    episode_id: str | None
    label: str
    changed: bool = Field(description="False when the same feedback was already stored.")
    adjustment: dict[str, float] = Field(
        description="Each test's threshold multiple in force at the latest feedback's time,"
        " outside the hours of day it marked (1.0: the version's own threshold)."
    )
    adjustment_detail: dict[str, Any] = Field(
        description="What the multiples are made of: the fading multiples at `time` (point,"
        " shift, divergence), their `half_life` in seconds, the `caps`, each test's 24 UTC"
        " `hours` multiples and the `ceiling` (detector.feedback.Adjustment)."
    )


async def _publish(services: ServicesDep, series_id: str) -> Adjustment:
    rows = await list_feedback(services.store.pool, series_id)
    found, through = series_adjustment(rows)
    await publish_adjustment(services.store.redis, series_id, found, through)
    return found


@router.post(
    "/anomalies/{episode_id:path}/feedback",
    response_model=FeedbackAnswer,
    summary="Judge an episode: a false or a true positive",
    openapi_extra=body_schema(EpisodeFeedbackBody),
)
async def episode_feedback(
    episode_id: Annotated[
        str,
        Path(
            pattern=EPISODE_ID.pattern,
            description="The episode's id (its opener's source id).",
        ),
    ],
    body: Annotated[EpisodeFeedback, Depends(json_body(EpisodeFeedback))],
    services: ServicesDep,
) -> FeedbackAnswer:
    """A false positive widens the threshold of the test that fired on the episode's opener
    for its series' stream, fading with time, more at the opener's hour of day, and never
    beyond a little more than the opener's strength (a true positive changes nothing); see
    the stream contract. The same feedback again changes nothing; another label for the same
    episode replaces it."""
    if not EPISODE_ID.match(episode_id):
        raise InvalidInputError("an episode id is 1-512 printable ASCII characters, no spaces")
    if body.label == "missed":
        raise InvalidInputError(
            "a missed range is not an episode's: POST /series/{series_id}/feedback"
            ' with {"label": "missed", "from": ..., "to": ...}'
        )
    if body.from_ is not None or body.to is not None:
        raise InvalidInputError("from and to are for missed ranges, not for an episode")
    named = None if body.series_id is None else validate_series_id(body.series_id)
    episode = await find_episode(services.store.pool, episode_id, named)
    row_id, changed = await record_feedback(
        services.store.pool,
        series_id=episode.series_id,
        label=body.label,
        episode=episode,
        episode_id=episode_id,
        note=body.note,
    )
    adjustment = await _publish(services, episode.series_id)
    return FeedbackAnswer(
        id=row_id,
        series_id=episode.series_id,
        episode_id=episode_id,
        label=body.label,
        changed=changed,
        adjustment=adjustment.in_force(),
        adjustment_detail=adjustment.to_dict(),
    )


@router.post(
    "/series/{series_id}/feedback",
    response_model=FeedbackAnswer,
    summary="Mark a time range of a series as a missed anomaly",
    openapi_extra=body_schema(MissedFeedbackBody),
)
async def series_feedback(
    series_id: SeriesIdDep,
    body: Annotated[MissedFeedback, Depends(json_body(MissedFeedback))],
    services: ServicesDep,
) -> FeedbackAnswer:
    """A missed range (no alert where there should have been one) narrows every test's
    threshold for the series' stream, fading with time. It needs no episode; the same range
    again changes nothing."""
    if body.label != "missed":
        raise InvalidInputError(
            f"{body.label} judges an episode: POST /anomalies/{{episode_id}}/feedback"
        )
    if body.from_ is None or body.to is None:
        raise InvalidInputError("a missed range needs from and to (reading timestamps)")
    if body.from_ > body.to:
        raise InvalidInputError(f"from ({body.from_}) is after to ({body.to})")
    model = await find_model(services.store, series_id, None)  # 404 for an unknown series
    row_id, changed = await record_feedback(
        services.store.pool,
        series_id=series_id,
        label="missed",
        version=model.version,
        from_ts=body.from_,
        to_ts=body.to,
        note=body.note,
    )
    adjustment = await _publish(services, series_id)
    return FeedbackAnswer(
        id=row_id,
        series_id=series_id,
        episode_id=None,
        label="missed",
        changed=changed,
        adjustment=adjustment.in_force(),
        adjustment_detail=adjustment.to_dict(),
    )


@read_router.get("/series/{series_id}/feedback", summary="A series' feedback and adjustment")
async def get_feedback(series_id: SeriesIdDep, services: ServicesDep) -> dict[str, Any]:
    """Every piece of feedback on the series, oldest first, and the threshold multiples they
    add up to (``adjustment``, and what they are made of, ``adjustment_detail``)."""
    await find_model(services.store, series_id, None)  # 404 for an unknown series
    rows = await list_feedback(services.store.pool, series_id)
    found, _ = series_adjustment(rows)
    return {
        "series_id": series_id,
        "adjustment": found.in_force(),
        "adjustment_detail": found.to_dict(),
        "feedback": [public(r) for r in rows],
    }
