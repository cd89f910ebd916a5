"""The stream wire format: readings in, anomaly events and dead letters out (flat string fields)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

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
# Every field of an anomaly event, in the order they are written (DESIGN "Stream contract").
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
