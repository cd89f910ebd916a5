"""Fast parsing of the array bodies (fit, batch predict): orjson and numpy, no per-item
pydantic objects. The pydantic models in `api.schemas` still document them in OpenAPI.

Two content types: JSON (``application/json``, also the default when a request names none)
and Apache Arrow IPC streams (``application/vnd.apache.arrow.stream``, decoded by
`api.arrow`); any other is a 415. An Arrow fit's options (``sigma``, ``direction``,
``kind``) are query parameters, checked by the same `FitOptions` model as a JSON body's
fields; a JSON fit keeps them in its body, and the same names as query parameters are a 422
there rather than silently ignored.

A million-point fit spends most of its time here, so the arrays go straight from JSON lists
into numpy; only the small option fields go through pydantic. Memory is bounded before
parsing allocates: the body is streamed into one buffer while its commas are counted, so a
body holding more items than the point limit allows is refused (413) before any parsing, and
flat number arrays are parsed a slice at a time into preallocated numpy arrays (a whole-body
``orjson.loads`` would hold ~70 bytes of Python objects per point).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import orjson
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from api.schemas import ARROW_MEDIA_TYPE, Direction, FitOptions, Kind
from detector.bulk_fit import SeriesPoints, group_columns
from detector.errors import AnomalyError, InvalidInputError, TooLargeError
from detector.kinds.training import FloatArray, IntArray, as_timestamps, as_values

# Bodies above this size are parsed in a worker thread so the event loop keeps serving.
THREAD_PARSE_BYTES = 256 * 1024
_NUMBER_TYPES = {int, float}
# Flat arrays are parsed this many bytes at a time (~90,000 numbers, ~6 MiB of objects).
_SLICE_BYTES = 1024 * 1024
# Commas a fit body may hold besides those between array items (between its fields).
_OPTION_COMMAS = 16
_BLANK = re.compile(rb"[ \t\n\r]*")
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
# What a flat array (``[`` to the first ``]``) may not hold: it would not be flat.
_NOT_FLAT = (b"[", b"{", b"}", b'"')
_DIGITS_AS_ZERO = bytes.maketrans(b"0123456789", b"0000000000")
_SCALAR = re.compile(rb'"(?:[^"\\]|\\.)*"|[^\s,{}\[\]]+')


T = TypeVar("T")

JSON_MEDIA_TYPE = "application/json"
_OPTION_NAMES = frozenset(FitOptions.model_fields)


class UnsupportedMediaTypeError(AnomalyError):
    """A body of a content type the route does not take (HTTP 415)."""


@dataclass(frozen=True, slots=True)
class ArrayBody:
    """Parsed ``timestamps`` (as given: ints or floats) and ``values`` (float64)."""

    timestamps: np.ndarray[Any, Any]
    values: FloatArray
    sigma: float | None = None
    direction: Direction | None = None
    kind: Kind | None = None


def checked_points(
    body: ArrayBody, limit: int, too_many: Callable[[int], str]
) -> tuple[IntArray, FloatArray]:
    """A batch's or a backfill's points under the training data's rules: as many timestamps
    as values, at most ``limit`` of them (else ``too_many(n)`` as a 413), each valid (JSON
    cannot carry NaN or infinity; an Arrow body can)."""
    n = len(body.values)
    if len(body.timestamps) != n:
        raise InvalidInputError(
            f"timestamps and values must have the same length (got {len(body.timestamps)} and {n})"
        )
    if n > limit:
        raise TooLargeError(too_many(n))
    return as_timestamps(body.timestamps), as_values(body.values)


def _invalid(loc: tuple[str | int, ...], msg: str, kind: str) -> RequestValidationError:
    return RequestValidationError([{"loc": ("body", *loc), "msg": msg, "type": kind}])


def _numbers(body: dict[str, Any], field: str, *, as_float: bool) -> np.ndarray[Any, Any]:
    if field not in body:
        raise _invalid((field,), "Field required", "missing")
    items = body[field]
    if isinstance(items, _FlatArray):
        return items.numbers(field, as_float=as_float)
    if not isinstance(items, list):
        raise _invalid((field,), "Input should be a valid list", "list_type")
    return _as_array(items, field, 0, as_float=as_float)


def _as_array(
    items: list[Any],
    field: str,
    offset: int,
    *,
    as_float: bool,
    found: set[type] | None = None,
) -> np.ndarray[Any, Any]:
    """``items`` (the array's items from index ``offset`` on) as int64 or float64; ``found``,
    when the caller knows them, the items' types."""
    found = set(map(type, items)) if found is None else found
    if not found <= _NUMBER_TYPES:  # bool, str, None, lists … are not numbers here
        index = next(i for i, item in enumerate(items) if type(item) not in _NUMBER_TYPES)
        raise _invalid((field, offset + index), "Input should be a number", "number_type")
    try:
        if as_float:
            return np.asarray(items, dtype=np.float64)
        if found <= {int}:
            return np.asarray(items, dtype=np.int64)
    except OverflowError:
        raise _invalid((field,), "Numbers should fit in 64 bits", "number_overflow") from None
    return _whole_numbers(items)


def _whole_numbers(items: list[int | float]) -> np.ndarray[Any, Any]:
    """Integers and integral floats (``393.0``) as the int64 integers they are, exactly: read
    as float64, integers beyond 2**53 would round and two distinct timestamps could become one.
    float64 when one has a fraction or is beyond int64 (the timestamp rule refuses those)."""
    as_floats = np.asarray(items, dtype=np.float64)
    if not np.all(np.isfinite(as_floats)) or not np.all(as_floats == np.floor(as_floats)):
        return as_floats
    if as_floats.size == 0 or np.abs(as_floats).max() < 2**53:
        return as_floats.astype(np.int64)  # every item is exact in float64
    try:
        return np.array([int(item) for item in items], dtype=np.int64)
    except OverflowError:
        return as_floats


class _NotFlat(Exception):
    """The body is not a plain object of flat arrays and scalars; parse it whole."""


@dataclass(frozen=True, slots=True)
class _FlatArray:
    """A JSON array of the body holding no strings, objects or arrays, from ``[`` to ``]``."""

    raw: bytes | bytearray
    start: int
    end: int

    def numbers(self, field: str, *, as_float: bool) -> np.ndarray[Any, Any]:
        """Parsed a slice at a time into one preallocated array: the Python objects of one
        slice are all that exist at once."""
        raw, first, last = self.raw, self.start + 1, self.end - 1
        if _skip_blank(raw, first) >= last:
            return np.empty(0, dtype=np.float64 if as_float else np.int64)
        out = np.empty(raw.count(b",", first, last) + 1, dtype=np.float64 if as_float else np.int64)
        index, pos = 0, first
        while pos < last:
            cut = raw.find(b",", min(pos + _SLICE_BYTES, last), last)
            cut = last if cut < 0 else cut
            piece = b"[" + raw[pos:cut] + b"]"
            try:
                items = orjson.loads(piece)
            except orjson.JSONDecodeError:
                raise _NotFlat from None
            as_float = out.dtype == np.float64
            part = _as_array(items, field, index, as_float=as_float, found=_item_types(piece))
            if part.dtype != out.dtype:  # a fractional timestamp: all become floats
                out = out.astype(np.float64)
            out[index : index + len(part)] = part
            index, pos = index + len(part), cut + 1
        return out


def _item_types(piece: bytes) -> set[type] | None:
    """The types of the items of ``piece``, a flat JSON array that orjson parsed, read off its
    bytes (byte searches run ~50x faster than ``set(map(type, items))``); None when they cannot
    be told so (the caller looks at the items). Such an array holds numbers, ``true``,
    ``false`` and ``null`` only, and a number has no letter but ``e``/``E``; orjson makes an
    integer literal a float when it is beyond 64 bits, which one of at most 18 digits never is.
    """
    if b"t" in piece or b"f" in piece or b"n" in piece:
        return None  # a non-number is among them
    if b"." in piece or b"e" in piece or b"E" in piece:
        return {float}  # (perhaps ints too: the array is float64 either way)
    if b"0" * 19 in piece.translate(_DIGITS_AS_ZERO):
        return None
    return {int}


def _skip_blank(raw: bytes | bytearray, pos: int) -> int:
    match = _BLANK.match(raw, pos)
    assert match is not None  # the pattern matches the empty string
    return match.end()


def _flat_array_end(raw: bytes | bytearray, start: int) -> int | None:
    """The end of the flat array opening at ``start`` (just past its ``]``); None when the
    array holds strings, objects or arrays. Byte searches, not a regular expression: a
    character class scanned by ``re`` over a million-point array cost a third of the parse."""
    close = raw.find(b"]", start + 1)
    if close < 0 or any(raw.find(c, start + 1, close) >= 0 for c in _NOT_FLAT):
        return None
    return close + 1


def _parse_flat(raw: bytes | bytearray) -> dict[str, Any] | None:
    """The body's top-level object, its flat arrays left unparsed (``_FlatArray``) and its
    other values parsed; None when it is not such an object."""
    body: dict[str, Any] = {}
    pos = _skip_blank(raw, 0)
    if raw[pos : pos + 1] != b"{":
        return None
    pos = _skip_blank(raw, pos + 1)
    closing = raw[pos : pos + 1] == b"}"
    while not closing:
        key = _STRING.match(raw, pos)
        if key is None:
            return None
        pos = _skip_blank(raw, key.end())
        if raw[pos : pos + 1] != b":":
            return None
        pos = _skip_blank(raw, pos + 1)
        try:
            name = orjson.loads(key.group())
            if raw[pos : pos + 1] == b"[":
                end = _flat_array_end(raw, pos)
                if end is None:
                    return None
                body[name] = _FlatArray(raw, pos, end)
            else:
                value = _SCALAR.match(raw, pos)
                if value is None:
                    return None
                body[name] = orjson.loads(value.group())
                end = value.end()
        except orjson.JSONDecodeError:
            return None
        pos = _skip_blank(raw, end)
        if raw[pos : pos + 1] == b",":
            pos = _skip_blank(raw, pos + 1)
        elif raw[pos : pos + 1] == b"}":
            closing = True
        else:
            return None
    return body if _skip_blank(raw, pos + 1) == len(raw) else None


def _parse(raw: bytes | bytearray, *, with_options: bool) -> ArrayBody:
    flat = _parse_flat(raw)
    if flat is not None:
        try:
            return _from_body(flat, with_options=with_options)
        except _NotFlat:
            pass  # a slice that is not valid JSON: the whole-body parse says where
    return _from_body(_json_object(raw), with_options=with_options)


def _json_object(raw: bytes | bytearray) -> dict[str, Any]:
    """The body parsed whole, which must be a JSON object (a 422 saying why not)."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise _invalid((), f"JSON decode error: {exc}", "json_invalid") from None
    if not isinstance(body, dict):
        raise _invalid((), "Input should be a JSON object", "dict_type")
    return body


def _from_body(body: dict[str, Any], *, with_options: bool) -> ArrayBody:
    timestamps = _numbers(body, "timestamps", as_float=False)
    values = _numbers(body, "values", as_float=True)
    rest = {k: v for k, v in body.items() if k not in ("timestamps", "values")}
    if not with_options:
        if rest:
            raise _invalid((next(iter(rest)),), "Extra inputs are not permitted", "extra_forbidden")
        return ArrayBody(timestamps, values)
    options = _options(rest, "body")
    return ArrayBody(timestamps, values, options.sigma, options.direction, options.kind)


def _options(given: dict[str, Any], where: str) -> FitOptions:
    """A JSON body's fit options, its errors located under ``where``."""
    try:
        return FitOptions.model_validate(given)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**e, "loc": (where, *e["loc"])} for e in exc.errors(include_input=False)]
        ) from None


async def _receive(
    request: Request, *, max_items: int | None, what: str, commas_per_item: int = 2
) -> bytearray:
    """The body in one buffer (no second copy). A JSON body (``max_items`` given) is refused
    with a 413 as soon as it holds more commas than a body of ``max_items`` points can: two
    arrays of n items have 2(n - 1) (a bulk fit's series add at most one comma a point: 3).
    An Arrow body's rows are counted from its batch headers before any batch is decoded
    (`api.arrow`); BodyGuard bounds its bytes meanwhile."""
    limit = None if max_items is None else commas_per_item * (max_items - 1) + _OPTION_COMMAS
    commas = 0
    buffer = bytearray()
    async for chunk in request.stream():
        if limit is not None:
            commas += chunk.count(b",")
            if commas > limit:
                raise TooLargeError(
                    f"{what} takes at most {max_items} points (this body holds more items)"
                )
        buffer += chunk
    return buffer


# Types under which clients commonly send a JSON text without saying so.
_JSON_TEXT_TYPES = frozenset({"application/x-www-form-urlencoded", "text/plain"})


def _is_arrow(request: Request) -> bool:
    """True for an Arrow stream body, False for JSON (also when no content type is given, and
    for the types plain clients send a JSON text with: ``curl -d`` says form-urlencoded);
    UnsupportedMediaTypeError (415) for anything else."""
    header = request.headers.get("content-type", "")
    media_type = header.split(";", 1)[0].strip().lower()
    if media_type == ARROW_MEDIA_TYPE:
        return True
    if (
        not media_type
        or media_type == JSON_MEDIA_TYPE
        or media_type.endswith("+json")
        or media_type in _JSON_TEXT_TYPES
    ):
        return False
    raise UnsupportedMediaTypeError(
        f"unsupported content type {header[:100]!r}: this route takes {JSON_MEDIA_TYPE} "
        f"or {ARROW_MEDIA_TYPE} (an Arrow IPC stream, not the file format)"
    )


def _query_options(request: Request, *, as_options: bool) -> FitOptions | None:
    """An Arrow fit's options from its query parameters, validated like a JSON body's fields
    (unknown names refused); for a JSON fit, a check that none of them is in the query."""
    items = request.query_params.multi_items()
    if not as_options:
        for name, _ in items:
            if name in _OPTION_NAMES:
                raise RequestValidationError(
                    [
                        {
                            "loc": ("query", name),
                            "msg": "a JSON fit takes its options in the body; query "
                            "parameters carry them for Arrow bodies only",
                            "type": "extra_forbidden",
                        }
                    ]
                )
        return None
    given: dict[str, str] = {}
    for name, value in items:
        if name in given:
            raise RequestValidationError(
                [{"loc": ("query", name), "msg": "given more than once", "type": "duplicate"}]
            )
        given[name] = value
    try:
        return FitOptions.model_validate_strings(given)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**e, "loc": ("query", *e["loc"])} for e in exc.errors(include_input=False)]
        ) from None


def _parse_arrow(
    raw: bytearray, options: FitOptions | None, *, max_items: int, what: str
) -> ArrayBody:
    # Imported with the first Arrow body: pyarrow adds ~26 MiB to the RSS of a process that
    # may never see one.
    from api import arrow

    timestamps, values = arrow.decode(raw, max_points=max_items, what=what)
    if options is None:
        return ArrayBody(timestamps, values)
    return ArrayBody(timestamps, values, options.sigma, options.direction, options.kind)


async def _read(
    request: Request,
    *,
    with_options: bool,
    max_items: int,
    what: str,
    parse_json: Callable[[bytearray], T],
    parse_arrow: Callable[[bytearray, FitOptions | None], T],
    commas_per_item: int = 2,
) -> T:
    parse: Callable[[], T]
    threaded = False
    if _is_arrow(request):
        threaded = "api.arrow" not in sys.modules  # its first import: off the event loop
        options = _query_options(request, as_options=True) if with_options else None
        raw = await _receive(request, max_items=None, what=what)

        def parse() -> T:
            return parse_arrow(raw, options)

    else:
        if with_options:
            _query_options(request, as_options=False)
        raw = await _receive(
            request, max_items=max_items, what=what, commas_per_item=commas_per_item
        )

        def parse() -> T:
            return parse_json(raw)

    if threaded or len(raw) > THREAD_PARSE_BYTES:
        return await run_in_threadpool(parse)
    return parse()


async def _read_arrays(
    request: Request, *, with_options: bool, max_items: int, what: str
) -> ArrayBody:
    return await _read(
        request,
        with_options=with_options,
        max_items=max_items,
        what=what,
        parse_json=lambda raw: _parse(raw, with_options=with_options),
        parse_arrow=lambda raw, options: _parse_arrow(raw, options, max_items=max_items, what=what),
    )


async def fit_body(request: Request) -> ArrayBody:
    settings = request.app.state.services.settings
    return await _read_arrays(
        request, with_options=True, max_items=settings.max_training_points, what="a fit"
    )


async def batch_body(request: Request) -> ArrayBody:
    settings = request.app.state.services.settings
    return await _read_arrays(
        request, with_options=False, max_items=settings.max_batch_points, what="a batch"
    )


@dataclass(frozen=True, slots=True)
class BulkBody:
    """A bulk fit's series (their points not yet checked: each is refused or fitted on its
    own) and the options that apply to all of them."""

    series: Iterable[SeriesPoints]
    sigma: float | None = None
    direction: Direction | None = None
    kind: Kind | None = None


_BULK_WHAT = "a bulk fit"
_BULK_FIELDS = frozenset({"series_id", "timestamps", "values"})


async def bulk_fit_body(request: Request) -> BulkBody:
    """``POST /fit``: JSON ``{"series": [{"series_id", "timestamps", "values"}, …], options}``
    or an Arrow stream of ``series_id``, ``timestamp`` and ``value`` rows (options in the
    query); at most ``max_bulk_fit_points`` points in all (413 beyond). A malformed body is a
    422 of the whole request; points that break a fit's rules only refuse their series."""
    limit = request.app.state.services.settings.max_bulk_fit_points
    return await _read(
        request,
        with_options=True,
        max_items=limit,
        what=_BULK_WHAT,
        parse_json=lambda raw: _parse_bulk(raw, limit),
        parse_arrow=lambda raw, options: _parse_bulk_arrow(raw, options, limit),
        commas_per_item=3,
    )


def _parse_bulk(raw: bytes | bytearray, limit: int) -> BulkBody:
    # One whole-body parse (not the sliced one of a single fit's flat arrays): a bulk body is
    # many small arrays, and its points are bounded by the limit checked as commas arrived.
    body = _json_object(raw)
    if "series" not in body:
        raise _invalid(("series",), "Field required", "missing")
    entries = body["series"]
    options = _options({k: v for k, v in body.items() if k != "series"}, "body")
    if not isinstance(entries, list):
        raise _invalid(("series",), "Input should be a valid list", "list_type")
    if not entries:
        raise _invalid(
            ("series",), "List should have at least 1 item after validation", "too_short"
        )
    series: list[SeriesPoints] = []
    points = 0
    for index, entry in enumerate(entries):
        where: tuple[str | int, ...] = ("series", index)
        if not isinstance(entry, dict):
            raise _invalid(where, "Input should be a valid dictionary", "dict_type")
        for name in entry.keys() - _BULK_FIELDS:
            raise _invalid((*where, name), "Extra inputs are not permitted", "extra_forbidden")
        if "series_id" not in entry:
            raise _invalid((*where, "series_id"), "Field required", "missing")
        series_id = entry["series_id"]
        if not isinstance(series_id, str):
            raise _invalid((*where, "series_id"), "Input should be a valid string", "string_type")
        try:
            timestamps = _numbers(entry, "timestamps", as_float=False)
            values = _numbers(entry, "values", as_float=True)
        except RequestValidationError as exc:
            raise RequestValidationError(
                [{**e, "loc": ("body", *where, *e["loc"][1:])} for e in exc.errors()]
            ) from None
        points += max(len(timestamps), len(values))
        series.append(SeriesPoints(series_id, timestamps, values))
    if points > limit:
        raise TooLargeError(f"{_BULK_WHAT} takes at most {limit} points (got {points})")
    return BulkBody(series, options.sigma, options.direction, options.kind)


def _parse_bulk_arrow(raw: bytearray, options: FitOptions | None, limit: int) -> BulkBody:
    from api import arrow

    series_ids, timestamps, values = arrow.decode(
        raw, max_points=limit, what=_BULK_WHAT, columns=arrow.BULK_COLUMN_TYPES
    )
    if len(values) == 0:
        raise InvalidInputError(f"{_BULK_WHAT} needs at least one series (the body has no rows)")
    series = group_columns(series_ids, timestamps, values)
    if options is None:
        return BulkBody(series)
    return BulkBody(series, options.sigma, options.direction, options.kind)
