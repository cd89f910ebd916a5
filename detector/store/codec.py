"""How a model version is written down: its compact Redis form and PostgreSQL's binary COPY rows."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
import psycopg

from detector.identifiers import format_version
from detector.kinds.registry import model_from_dict
from detector.kinds.static import StaticModel
from detector.kinds.training import TrainingData

_DIRECTION_CODES = {"above": "a", "below": "b", "both": "ab"}
_DIRECTIONS_BY_CODE = {code: name for name, code in _DIRECTION_CODES.items()}
# A kind other than static, as a letter after the direction code ("as": above, seasonal); no
# direction code ends in one of them.
_KIND_CODES = {"seasonal": "s", "multiscale": "m"}
_KINDS_BY_CODE = {code: name for name, code in _KIND_CODES.items()}


@dataclass(frozen=True, slots=True)
class ModelVersion:
    """One immutable fitted version of a series' model."""

    series_id: str
    version: int
    model: StaticModel
    points_used: int
    created_at: datetime
    mlflow_run_id: str | None = None

    @property
    def name(self) -> str:
        return format_version(self.version)

    def to_redis(self) -> str:
        """The Redis copy: a compact JSON array ``[mean, std, sigma, code, points_used,
        created_at]``: the code is the direction, "a", "b" or "ab" for above, below, both,
        followed by "s" or "m" for the seasonal and multiscale kinds (nothing for static);
        created_at in whole seconds.

        Compact because of how Redis stores a small hash: while every value is at most
        ``hash-max-ziplist-value`` (64) bytes, the whole hash is one packed allocation; one longer
        value turns it into a hash table, about twice the memory. Typical models take 55-62
        bytes here, so a series costs ~170 bytes of Redis instead of ~450 (the kind's name
        appended, as versions were written before, took every seasonal model past 64).
        PostgreSQL keeps the exact ``created_at``; mean, std and sigma round-trip exactly
        (shortest repr).
        """
        model = self.model
        fields: list[Any] = [
            model.mean,
            model.std,
            model.sigma,
            _DIRECTION_CODES[model.direction] + _KIND_CODES.get(model.kind, ""),
            self.points_used,
            int(self.created_at.timestamp()),
        ]
        return orjson.dumps(fields).decode()

    @classmethod
    def from_redis(cls, series_id: str, version: int, raw: str) -> ModelVersion:
        data = orjson.loads(raw)
        if isinstance(data, dict):  # the earlier form, still in Redis from older versions
            return cls(
                series_id=series_id,
                version=version,
                model=model_from_dict(data),
                points_used=int(data["n"]),
                created_at=datetime.fromtimestamp(float(data["at"]), tz=UTC),
            )
        mean, std, sigma, code, points_used, created_at, *named = data
        kind = _KINDS_BY_CODE.get(code[-1], "static")
        if kind != "static":
            code = code[:-1]
        model = model_from_dict(
            {
                # Written before the kind had a letter: its name after created_at.
                "kind": named[0] if named else kind,
                "mean": mean,
                "std": std,
                "sigma": sigma,
                "direction": _DIRECTIONS_BY_CODE[code],
            }
        )
        return cls(
            series_id=series_id,
            version=version,
            model=model,
            points_used=int(points_used),
            created_at=datetime.fromtimestamp(created_at, tz=UTC),
        )

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> ModelVersion:
        return cls(
            series_id=row["series_id"],
            version=int(row["version"]),
            model=model_from_dict(row),
            points_used=int(row["points_used"]),
            created_at=row["created_at"],
            mlflow_run_id=row.get("mlflow_run_id"),
        )


# PostgreSQL's binary COPY format: a header, then per row a field count and length-prefixed
# big-endian fields. Building and reading it with numpy takes milliseconds for a million
# points.
_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + b"\x00\x00\x00\x00" + b"\x00\x00\x00\x00"
_COPY_TRAILER = b"\xff\xff"
_ROW_OUT = np.dtype([("n", ">i2"), ("l1", ">i4"), ("ts", ">i8"), ("l2", ">i4"), ("value", ">f8")])


# A version's points as one row of two arrays (``training_arrays``): an array in binary COPY
# is a 20-byte header (dimensions 1, no NULLs, the element type, length, lower bound 1), then
# per element its length (8) and its big-endian value.
_INT8_OID, _FLOAT8_OID = 20, 701
_ELEMENT_INT8 = np.dtype([("l", ">i4"), ("v", ">i8")])
_ELEMENT_FLOAT8 = np.dtype([("l", ">i4"), ("v", ">f8")])
_ARRAY_HEADER = struct.Struct(">iiiii")


def _array_field(
    values: npt.NDArray[Any], element: np.dtype[Any], oid: int
) -> tuple[bytes, memoryview]:
    """An array field in two parts, its length and header, then its elements (not joined:
    a million points' elements are written as they are, without another copy)."""
    items = np.empty(len(values), dtype=element)
    items["l"], items["v"] = 8, values
    head = _ARRAY_HEADER.pack(1, 0, oid, len(values), 1)
    return struct.pack(">i", len(head) + items.nbytes) + head, items.data.cast("B")


def _array_values(payload: bytes, offset: int, element: np.dtype[Any]) -> tuple[Any, int]:
    """The elements of the array field at ``offset`` and the offset after it."""
    (size,) = struct.unpack_from(">i", payload, offset)
    start = offset + 4
    ndim, _, _ = struct.unpack_from(">iii", payload, start)
    if ndim == 0:  # an empty array has no dimensions
        return np.empty(0, dtype=element)["v"], start + size
    (length,) = struct.unpack_from(">i", payload, start + 12)
    items = np.frombuffer(payload, dtype=element, count=length, offset=start + 20)
    return items["v"], start + size


# Small rows are joined into writes of about this size; a larger part is written as it is.
_WRITE_BYTES = 1 << 20


async def copy_points(
    conn: psycopg.AsyncConnection[Any], rows: Sequence[tuple[int, TrainingData]]
) -> None:
    """Each version's points (``(model_id, data)``) as one ``training_arrays`` row, all in one
    COPY: 16 bytes a point on disk, not a row each. The small rows of a bulk fit are joined
    into writes of about a MiB; a million points' elements are written as they are."""
    async with conn.cursor().copy(
        "COPY training_arrays (model_id, ts, value) FROM STDIN (FORMAT BINARY)"
    ) as copy:
        pending: list[bytes | memoryview] = [_COPY_HEADER]
        size = len(_COPY_HEADER)
        for model_id, data in rows:
            ts_head, ts_items = _array_field(data.timestamps, _ELEMENT_INT8, _INT8_OID)
            value_head, value_items = _array_field(data.values, _ELEMENT_FLOAT8, _FLOAT8_OID)
            row_head = struct.pack(">hiq", 3, 8, model_id) + ts_head
            for part in (row_head, ts_items, value_head, value_items):
                if len(part) < _WRITE_BYTES:
                    pending.append(part)
                    size += len(part)
                    continue
                if pending:
                    await copy.write(b"".join(pending))
                    pending, size = [], 0
                await copy.write(part)
            if size >= _WRITE_BYTES:
                await copy.write(b"".join(pending))
                pending, size = [], 0
        pending.append(_COPY_TRAILER)
        await copy.write(b"".join(pending))


def parse_arrays(payload: bytes) -> TrainingData | None:
    """The points of ``COPY (SELECT ts, value FROM training_arrays …) TO STDOUT (FORMAT
    BINARY)``; None when it holds no row (a version stored a row a point, or none)."""
    offset = len(_COPY_HEADER)
    if len(payload) <= offset + len(_COPY_TRAILER):
        return None
    (fields,) = struct.unpack_from(">h", payload, offset)
    if fields != 2:
        return None
    ts, offset = _array_values(payload, offset + 2, _ELEMENT_INT8)
    values, _ = _array_values(payload, offset, _ELEMENT_FLOAT8)
    return TrainingData(timestamps=ts.astype(np.int64), values=values.astype(np.float64))


def parse_points(payload: bytes) -> TrainingData:
    """The points of ``COPY (SELECT ts, value FROM training_points …)`` (a row a point: the
    versions stored before ``training_arrays``)."""
    body = payload[len(_COPY_HEADER) : len(payload) - len(_COPY_TRAILER)]
    rows = np.frombuffer(body, dtype=_ROW_OUT)
    return TrainingData(
        timestamps=rows["ts"].astype(np.int64), values=rows["value"].astype(np.float64)
    )
