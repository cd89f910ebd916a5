"""Typed dependencies of the routes: the store, settings, metrics, parsed ids and bodies.

Every dependency is ``async def``: FastAPI runs plain ``def`` dependencies in a thread pool,
which on the predict path cost more than the prediction itself.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, TypeVar

from fastapi import Depends, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool

from api.bodies import THREAD_PARSE_BYTES
from api.event_feed import EventFeed
from api.latency import LatencyWindow
from api.metrics import ApiMetrics
from api.plot_cache import PlotCache
from detector.errors import ModelNotFoundError
from detector.identifiers import (
    SERIES_ID_RULE,
    SERIES_ID_SCHEMA,
    VERSION_SCHEMA,
    parse_version,
    validate_series_id,
)
from detector.settings import Settings
from detector.store.codec import ModelVersion
from detector.store.models import ModelStore

B = TypeVar("B", bound=BaseModel)


@dataclass
class Services:
    """What the lifespan opens and the routes use; kept on ``app.state.services``."""

    settings: Settings
    store: ModelStore
    metrics: ApiMetrics
    inference_latency: LatencyWindow
    training_latency: LatencyWindow
    events: EventFeed
    plots: PlotCache


async def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


async def series_id_path(
    series_id: Annotated[str, Path(description=SERIES_ID_RULE, json_schema_extra=SERIES_ID_SCHEMA)],
) -> str:
    return validate_series_id(series_id)


async def series_id_query(
    series_id: Annotated[
        str, Query(description=SERIES_ID_RULE, json_schema_extra=SERIES_ID_SCHEMA)
    ],
) -> str:
    return validate_series_id(series_id)


VERSION_QUERY_HELP = "v3.0.0, v3 or 3; empty or absent means the latest version"


def version_query_value(version: str | None) -> tuple[int, int, int] | None:
    """The requested version, or None for the latest (checked before any lookup)."""
    if version is None or version == "":
        return None
    return parse_version(version)


async def version_query(
    version: Annotated[
        str | None, Query(description=VERSION_QUERY_HELP, json_schema_extra=VERSION_SCHEMA)
    ] = None,
) -> tuple[int, int, int] | None:
    return version_query_value(version)


async def find_model(
    store: ModelStore, series_id: str, requested: tuple[int, int, int] | None
) -> ModelVersion:
    """The model a request names; only X.0.0 versions exist, so v3.1.0 is simply not found."""
    if requested is None:
        return await store.get(series_id)
    major, minor, patch = requested
    if (minor, patch) != (0, 0):
        await store.latest_version(series_id)  # an unknown series is named as such
        raise ModelNotFoundError(f"no version v{major}.{minor}.{patch} for series '{series_id}'")
    return await store.get(series_id, major)


def series_and_version_parameters() -> list[dict[str, object]]:
    """OpenAPI's declaration of ``series_id`` (path) and ``version`` (query), as FastAPI
    derives it from ``SeriesIdDep`` and ``VersionDep``: for a route that reads both itself."""
    return [
        {
            "name": "series_id",
            "in": "path",
            "required": True,
            "schema": {
                "type": "string",
                "description": SERIES_ID_RULE,
                **SERIES_ID_SCHEMA,
                "title": "Series Id",
            },
            "description": SERIES_ID_RULE,
        },
        {
            "name": "version",
            "in": "query",
            "required": False,
            "schema": {
                "anyOf": [{"type": "string"}, {"type": "null"}],
                "description": VERSION_QUERY_HELP,
                **VERSION_SCHEMA,
                "title": "Version",
            },
            "description": VERSION_QUERY_HELP,
        },
    ]


SeriesIdDep = Annotated[str, Depends(series_id_path)]
SeriesIdQueryDep = Annotated[str, Depends(series_id_query)]
VersionDep = Annotated[tuple[int, int, int] | None, Depends(version_query)]


async def parse_json_body(model: type[B], raw: bytes) -> B:
    """``raw`` validated as ``model`` straight from bytes with pydantic's JSON parser (no
    intermediate Python objects); large bodies are parsed off the event loop. A body that does
    not validate raises RequestValidationError (422, located under ``body``)."""
    try:
        if len(raw) > THREAD_PARSE_BYTES:
            return await run_in_threadpool(model.model_validate_json, raw)
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_input=False)]
        ) from None


def json_body(model: type[B]) -> Callable[[Request], Awaitable[B]]:
    """A dependency parsing the body with ``parse_json_body``."""

    async def parse(request: Request) -> B:
        return await parse_json_body(model, await request.body())

    return parse
