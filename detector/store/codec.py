"""How a model version is written down: its compact Redis form and PostgreSQL's binary COPY rows."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import orjson
import psycopg

from detector.identifiers import format_version
from detector.kinds.registry import model_from_dict
from detector.kinds.static import StaticModel
from detector.kinds.training import TrainingData

_DIRECTION_CODES = {"above": "a", "below": "b", "both": "ab"}
_DIRECTIONS_BY_CODE = {code: name for name, code in _DIRECTION_CODES.items()}


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
        """The Redis copy: a compact JSON array ``[mean, std, sigma, direction, points_used,
        created_at]`` (direction "a", "b" or "ab" for above, below, both; created_at in whole
        seconds; the kind appended only when it is not "static").

        Compact because of how Redis stores a small hash: while every value is at most
        ``hash-max-ziplist-value`` (64) bytes, the whole hash is one packed allocation; one longer
        value turns it into a hash table, about twice the memory. Typical models take 55-64
        bytes here, so a series costs ~170 bytes of Redis instead of ~480. PostgreSQL keeps the
        exact ``created_at``; mean, std and sigma round-trip exactly (shortest repr).
        """
        model = self.model
        fields: list[Any] = [
            model.mean,
            model.std,
            model.sigma,
            _DIRECTION_CODES[model.direction],
            self.points_used,
            int(self.created_at.timestamp()),
        ]
        if model.kind != "static":
            fields.append(model.kind)
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
        mean, std, sigma, direction, points_used, created_at, *kind = data
        model = model_from_dict(
            {
                "kind": kind[0] if kind else "static",
                "mean": mean,
                "std": std,
                "sigma": sigma,
                "direction": _DIRECTIONS_BY_CODE[direction],
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
# big-endian fields. Building it with numpy writes a million rows in milliseconds.
_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + b"\x00\x00\x00\x00" + b"\x00\x00\x00\x00"
_COPY_TRAILER = b"\xff\xff"
_ROW_IN = np.dtype(
    [
        ("n", ">i2"),
        ("l1", ">i4"),
        ("model", ">i8"),
        ("l2", ">i4"),
        ("ts", ">i8"),
        ("l3", ">i4"),
        ("value", ">f8"),
    ]
)
_ROW_OUT = np.dtype([("n", ">i2"), ("l1", ">i4"), ("ts", ">i8"), ("l2", ">i4"), ("value", ">f8")])


async def copy_points(
    conn: psycopg.AsyncConnection[Any], model_id: int, data: TrainingData
) -> None:
    rows = np.empty(len(data), dtype=_ROW_IN)
    rows["n"], rows["l1"], rows["l2"], rows["l3"] = 3, 8, 8, 8
    rows["model"] = model_id
    rows["ts"] = data.timestamps
    rows["value"] = data.values
    async with conn.cursor().copy(
        "COPY training_points (model_id, ts, value) FROM STDIN (FORMAT BINARY)"
    ) as copy:
        await copy.write(_COPY_HEADER)
        await copy.write(rows.tobytes())
        await copy.write(_COPY_TRAILER)


def parse_points(payload: bytes) -> TrainingData:
    body = payload[len(_COPY_HEADER) : len(payload) - len(_COPY_TRAILER)]
    rows = np.frombuffer(body, dtype=_ROW_OUT)
    return TrainingData(
        timestamps=rows["ts"].astype(np.int64), values=rows["value"].astype(np.float64)
    )
