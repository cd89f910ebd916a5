"""Fast parsing of the array bodies (fit, batch predict): orjson and numpy, no per-item
pydantic objects. The pydantic models in `api.schemas` still document them in OpenAPI.

A million-point fit spends most of its time here, so the arrays go straight from JSON lists
into numpy; only the small option fields go through pydantic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from api.schemas import Direction, FitOptions, Kind
from detector.kinds.training import FloatArray

# Bodies above this size are parsed in a worker thread so the event loop keeps serving.
THREAD_PARSE_BYTES = 256 * 1024
_NUMBER_TYPES = {int, float}


@dataclass(frozen=True, slots=True)
class ArrayBody:
    """Parsed ``timestamps`` (as given: ints or floats) and ``values`` (float64)."""

    timestamps: np.ndarray[Any, Any]
    values: FloatArray
    sigma: float | None = None
    direction: Direction | None = None
    kind: Kind | None = None


def _invalid(loc: tuple[str | int, ...], msg: str, kind: str) -> RequestValidationError:
    return RequestValidationError([{"loc": ("body", *loc), "msg": msg, "type": kind}])


def _numbers(body: dict[str, Any], field: str, *, as_float: bool) -> np.ndarray[Any, Any]:
    if field not in body:
        raise _invalid((field,), "Field required", "missing")
    items = body[field]
    if not isinstance(items, list):
        raise _invalid((field,), "Input should be a valid list", "list_type")
    found = set(map(type, items))
    if not found <= _NUMBER_TYPES:  # bool, str, None, lists … are not numbers here
        index = next(i for i, item in enumerate(items) if type(item) not in _NUMBER_TYPES)
        raise _invalid((field, index), "Input should be a number", "number_type")
    try:
        if as_float:
            return np.asarray(items, dtype=np.float64)
        return np.asarray(items, dtype=np.int64 if found <= {int} else np.float64)
    except OverflowError:
        raise _invalid((field,), "Numbers should fit in 64 bits", "number_overflow") from None


def _parse(raw: bytes, *, with_options: bool) -> ArrayBody:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise _invalid((), f"JSON decode error: {exc}", "json_invalid") from None
    if not isinstance(body, dict):
        raise _invalid((), "Input should be a JSON object", "dict_type")
    timestamps = _numbers(body, "timestamps", as_float=False)
    values = _numbers(body, "values", as_float=True)
    rest = {k: v for k, v in body.items() if k not in ("timestamps", "values")}
    if not with_options:
        if rest:
            raise _invalid((next(iter(rest)),), "Extra inputs are not permitted", "extra_forbidden")
        return ArrayBody(timestamps, values)
    try:
        options = FitOptions.model_validate(rest)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_input=False)]
        ) from None
    return ArrayBody(timestamps, values, options.sigma, options.direction, options.kind)


async def _read(request: Request, *, with_options: bool) -> ArrayBody:
    raw = await request.body()
    if len(raw) > THREAD_PARSE_BYTES:
        return await run_in_threadpool(_parse, raw, with_options=with_options)
    return _parse(raw, with_options=with_options)


async def fit_body(request: Request) -> ArrayBody:
    return await _read(request, with_options=True)


async def batch_body(request: Request) -> ArrayBody:
    return await _read(request, with_options=False)
