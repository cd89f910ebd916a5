"""The one place where the service's exceptions become HTTP answers."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.routing import compile_path

from api.auth import ForbiddenError, UnauthorizedError
from api.bodies import UnsupportedMediaTypeError
from api.event_feed import TooManyClientsError
from api.metrics import ApiMetrics
from detector.errors import (
    AnomalyError,
    InvalidInputError,
    ModelNotFoundError,
    NotOnClusterError,
    StoreUnavailableError,
    TooLargeError,
    TrainingDataDeletedError,
)

STATUS_BY_ERROR: list[tuple[type[AnomalyError], int, str]] = [
    (UnauthorizedError, 401, "unauthorized"),
    (ForbiddenError, 403, "forbidden"),
    (InvalidInputError, 422, "invalid"),
    (TooLargeError, 413, "too_large"),
    (UnsupportedMediaTypeError, 415, "unsupported_media_type"),
    (ModelNotFoundError, 404, "not_found"),
    (TrainingDataDeletedError, 410, "gone"),
    (StoreUnavailableError, 503, "unavailable"),
    (TooManyClientsError, 503, "busy"),
    (NotOnClusterError, 501, "not_on_cluster"),
]


def classify(exc: AnomalyError) -> tuple[int, str]:
    """(HTTP status, outcome label) for one of our errors."""
    for cls, status, outcome in STATUS_BY_ERROR:
        if isinstance(exc, cls):
            return status, outcome
    return 500, "error"


def validation_errors(errors: Any) -> list[dict[str, Any]]:
    """Pydantic errors without the offending input (it can be a 60 MiB body) or ctx objects."""
    return [
        {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
        for e in errors
    ]


def allowed_methods(app: FastAPI, path: str) -> set[str]:
    """The methods the app's OpenAPI document declares at ``path`` (a request's path): routes
    that share a path each know only their own."""
    methods: set[str] = set()
    for template, operations in app.openapi().get("paths", {}).items():
        if compile_path(template)[0].match(path):
            methods.update(m.upper() for m in operations if m.upper() in _HTTP_METHODS)
    return methods


_HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"})


def install_error_handlers(app: FastAPI, metrics: ApiMetrics) -> None:
    async def on_anomaly_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, AnomalyError)
        status, outcome = classify(exc)
        metrics.request_errors.labels(outcome).inc()
        body: dict[str, Any] = {"detail": exc.detail}
        if isinstance(exc, StoreUnavailableError):
            body["dependency"] = exc.dependency
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        if isinstance(exc, TooManyClientsError):
            headers = {"Retry-After": "5"}
        return JSONResponse(body, status_code=status, headers=headers)

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        metrics.request_errors.labels("invalid").inc()
        return JSONResponse({"detail": validation_errors(exc.errors())}, status_code=422)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 405:  # the route that answered names only its own methods
            own = (exc.headers or {}).get("Allow", "")
            allowed = allowed_methods(app, request.url.path)
            allowed.update(m.strip() for m in own.split(",") if m.strip())
            exc.headers = {**(exc.headers or {}), "Allow": ", ".join(sorted(allowed))}
        return await http_exception_handler(request, exc)

    app.add_exception_handler(AnomalyError, on_anomaly_error)
    app.add_exception_handler(HTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
