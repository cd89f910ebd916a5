"""The stream wire format: readings in, anomaly events and dead letters out (flat string fields)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt

from detector.errors import InvalidSeriesError, InvalidVersionError
from detector.identifiers import format_version, parse_version, validate_series_id

DeadReason = Literal[
    "missing_field",
    "bad_series_id",
    "bad_value",
    "bad_timestamp",
    "bad_version",
    "unknown_version",
    "too_many_deliveries",
]
DEAD_REASONS: Final[tuple[str, ...]] = (
    "missing_field",
    "bad_series_id",
    "bad_value",
    "bad_timestamp",
    "bad_version",
    "unknown_version",
    "too_many_deliveries",
)

READING_FIELDS: Final = ("series_id", "timestamp", "value")
# Every field of an anomaly event, in the order they are written (docs/stream-contract.md).
EVENT_FIELDS: Final = (
    "series_id",
    "timestamp",
    "value",
    "model_version",
    "mean",
    "std",
    "lower",
    "upper",
    "score",
    "source_id",
    "detected_at",
)
_INT_EVENT_FIELDS: Final = frozenset({"timestamp"})
_FLOAT_EVENT_FIELDS: Final = frozenset(
    {"value", "mean", "std", "lower", "upper", "score", "detected_at"}
)
_DEAD_OWN_FIELDS: Final = frozenset({"source_id", "reason", "detail"})

# Same rule as the REST predict body: decimal digits only, so "1.5", "-1" and " 1" are refused.
_TIMESTAMP: Final = re.compile(r"[0-9]{1,19}")
_MAX_TIMESTAMP: Final = 2**62


@dataclass(frozen=True, slots=True)
class Reading:
    """A validated reading; ``version`` is a pinned major version, None for the latest."""

    source_id: str
    series_id: str
    timestamp: int
    value: float
    version: int | None = None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A `readings` entry that cannot be scored, and why."""

    source_id: str
    reason: DeadReason
    detail: str
    fields: Mapping[str, str]

    def to_fields(self) -> dict[str, str]:
        """`readings:dead` entry: source_id, reason, detail, then the original fields (a name
        that clashes with ours is kept as ``original:<name>``)."""
        out = {"source_id": self.source_id, "reason": self.reason, "detail": self.detail}
        for name, value in self.fields.items():
            out[f"original:{name}" if name in _DEAD_OWN_FIELDS else name] = value
        return out


def parse_reading(source_id: str, fields: Mapping[str, str]) -> Reading | DeadLetter:
    """Validate one `readings` entry's fields; never raises on bad input."""

    def dead(reason: DeadReason, detail: str) -> DeadLetter:
        return DeadLetter(source_id, reason, detail, dict(fields))

    missing = [name for name in READING_FIELDS if not fields.get(name)]
    if missing:
        return dead("missing_field", f"missing field(s): {', '.join(missing)}")
    series_id = fields["series_id"]
    try:
        validate_series_id(series_id)
    except InvalidSeriesError as exc:
        return dead("bad_series_id", exc.detail)
    raw_ts = fields["timestamp"]
    if _TIMESTAMP.fullmatch(raw_ts) is None or int(raw_ts) > _MAX_TIMESTAMP:
        return dead("bad_timestamp", "timestamp must be a non-negative integer (Unix seconds)")
    try:
        value = float(fields["value"])
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        return dead("bad_value", "value must be a finite number")
    version: int | None = None
    raw_version = fields.get("version")
    if raw_version:  # an empty `version` means the latest, as `?version=` does over REST
        try:
            major, minor, patch = parse_version(raw_version)
        except InvalidVersionError as exc:
            return dead("bad_version", exc.detail)
        if (minor, patch) != (0, 0):  # well-formed, but only X.0.0 versions are ever made
            return dead("unknown_version", f"no version {raw_version} for series '{series_id}'")
        version = major
    return Reading(source_id, series_id, int(raw_ts), value, version)


# A `readings` entry as Redis sends it: the id and its flat field list [name, value, ...]
# (None or empty when the entry was deleted while pending).
RawEntry = tuple[str, Sequence[str] | None]

# The whole batch's unique series ids, newline-joined, checked in one regex pass.
_SERIES_IDS_JOINED: Final = re.compile(r"(?:[A-Za-z0-9_.:\-]{1,128}\n)+")


@dataclass(slots=True)
class ReadingBatch:
    """Validated readings as columns (one row per reading), for scoring a batch at once.

    ``versions`` is None when no reading pins a version (the common case), else one entry per
    row (None: the latest).
    """

    source_ids: list[str]
    series_ids: list[str]
    timestamps: npt.NDArray[np.int64]
    values: npt.NDArray[np.float64]
    versions: list[int | None] | None = None

    def __len__(self) -> int:
        return len(self.source_ids)

    def reading(self, row: int) -> Reading:
        version = None if self.versions is None else self.versions[row]
        return Reading(
            self.source_ids[row],
            self.series_ids[row],
            int(self.timestamps[row]),
            float(self.values[row]),
            version,
        )

    @classmethod
    def from_readings(cls, readings: Sequence[Reading]) -> ReadingBatch:
        n = len(readings)
        versions = [r.version for r in readings]
        return cls(
            [r.source_id for r in readings],
            [r.series_id for r in readings],
            np.fromiter((r.timestamp for r in readings), dtype=np.int64, count=n),
            np.fromiter((r.value for r in readings), dtype=np.float64, count=n),
            None if all(v is None for v in versions) else versions,
        )


def as_fields(flat: Sequence[str] | None) -> dict[str, str]:
    """A raw entry's flat field list as a mapping (the last value of a repeated name wins)."""
    if not flat:
        return {}
    return dict(zip(flat[0::2], flat[1::2], strict=False))


def flat_fields(fields: Mapping[str, str] | None) -> list[str] | None:
    """Fields as redis-py parses them (a mapping) in the raw flat form."""
    if not fields:
        return None
    return [item for pair in fields.items() for item in pair]


def parse_batch(entries: Sequence[RawEntry]) -> tuple[ReadingBatch, list[DeadLetter]]:
    """Validate a batch of raw entries with the rules of ``parse_reading``, vectorised.

    Entries laid out as producers write them (exactly ``series_id``, ``timestamp``, ``value``,
    in that order) are checked column-wise: one regex pass over the batch's distinct series
    ids, one ``isdigit`` over the joined timestamps, ``float`` mapped over the values. If any
    of them fails, or an entry has another layout (a ``version``, extra fields), those entries
    go through ``parse_reading`` one by one, so the outcome is always the same as its.
    Deleted entries (no fields) are left out: the caller acknowledges them.
    """
    ids: list[str] = []
    series: list[str] = []
    stamps: list[str] = []
    values: list[str] = []
    others: list[tuple[str, Sequence[str]]] = []
    for entry_id, fields in entries:
        if not fields:
            continue
        if (
            len(fields) == 6
            and fields[0] == "series_id"
            and fields[2] == "timestamp"
            and fields[4] == "value"
        ):
            ids.append(entry_id)
            series.append(fields[1])
            stamps.append(fields[3])
            values.append(fields[5])
        else:
            others.append((entry_id, fields))
    columns = _columns(series, stamps, values) if ids else None
    if columns is None:  # something in the common layout is invalid: decide one by one
        others = [
            (i, ["series_id", s, "timestamp", t, "value", v])
            for i, s, t, v in zip(ids, series, stamps, values, strict=True)
        ] + others
        ids, series = [], []
        columns = (np.empty(0, np.int64), np.empty(0, np.float64))
    batch = ReadingBatch(ids, series, *columns)
    if not others:
        return batch, []
    dead: list[DeadLetter] = []
    readings: list[Reading] = []
    for entry_id, fields in others:
        parsed = parse_reading(entry_id, as_fields(fields))
        if isinstance(parsed, DeadLetter):
            dead.append(parsed)
        else:
            readings.append(parsed)
    if readings:
        batch = _concat(batch, ReadingBatch.from_readings(readings))
    return batch, dead


def _columns(
    series: list[str], stamps: list[str], values: list[str]
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]] | None:
    """Timestamps and values as arrays when every row passes every rule, else None."""
    distinct = dict.fromkeys(series)
    if (
        "." in distinct
        or ".." in distinct
        or _SERIES_IDS_JOINED.fullmatch("\n".join(distinct) + "\n") is None
    ):
        return None
    joined = "".join(stamps)
    if not (joined.isascii() and joined.isdigit()) or min(map(len, stamps)) == 0:
        return None
    if max(map(len, stamps)) > 19:
        return None
    n = len(stamps)
    try:
        ts = np.fromiter(map(int, stamps), dtype=np.int64, count=n)
        vals = np.fromiter(map(float, values), dtype=np.float64, count=n)
    except (ValueError, OverflowError):
        return None
    if int(ts.max()) > _MAX_TIMESTAMP or not bool(np.isfinite(vals).all()):
        return None
    return ts, vals


def _concat(a: ReadingBatch, b: ReadingBatch) -> ReadingBatch:
    versions = None
    if a.versions is not None or b.versions is not None:
        versions = (a.versions or [None] * len(a)) + (b.versions or [None] * len(b))
    return ReadingBatch(
        a.source_ids + b.source_ids,
        a.series_ids + b.series_ids,
        np.concatenate([a.timestamps, b.timestamps]),
        np.concatenate([a.values, b.values]),
        versions,
    )


def number(value: float) -> str:
    """A float as text that parses back to the same float (repr is shortest round-trip)."""
    return repr(float(value))


def event_fields(
    reading: Reading,
    *,
    version: int,
    mean: float,
    std: float,
    lower: float,
    upper: float,
    score: float,
    detected_at: float,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The `anomalies` entry of an anomalous reading; ``extra`` adds fields (episode_id …)
    after the contract's, which consumers that do not know them ignore."""
    fields = {
        "series_id": reading.series_id,
        "timestamp": str(reading.timestamp),
        "value": number(reading.value),
        "model_version": format_version(version),
        "mean": number(mean),
        "std": number(std),
        "lower": number(lower),
        "upper": number(upper),
        "score": number(score),
        "source_id": reading.source_id,
        "detected_at": f"{detected_at:.6f}",
    }
    if extra:
        fields.update({k: v for k, v in extra.items() if k not in fields})
    return fields


def decode_event(fields: Mapping[str, str]) -> dict[str, Any]:
    """An `anomalies` entry with typed numbers (for subscribers); unknown fields stay text."""
    out: dict[str, Any] = {}
    for name, value in fields.items():
        try:
            if name in _INT_EVENT_FIELDS:
                out[name] = int(value)
            elif name in _FLOAT_EVENT_FIELDS:
                out[name] = float(value)
            else:
                out[name] = value
        except ValueError:
            out[name] = value
    return out


def reading_fields(
    series_id: str, timestamp: int, value: float, version: str | None = None
) -> dict[str, str]:
    """The `readings` entry a producer writes."""
    fields = {"series_id": series_id, "timestamp": str(timestamp), "value": number(value)}
    if version:
        fields["version"] = version
    return fields
