"""The `anomalies` wire format: an event's flat text fields, written and decoded."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from detector.identifiers import format_version

if TYPE_CHECKING:
    from detector.wire.readings import Reading

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
# Every event's `type` (written after the contract fields above): an anomalous reading, a
# silent series (`no_data`, docs/stream-contract.md#silent-series), or an incident (episodes
# of many series opening together, docs/stream-contract.md#incidents). An event without one
# was written before types existed and is an anomaly.
ANOMALY: Final = "anomaly"
NO_DATA: Final = "no_data"
INCIDENT: Final = "incident"
EVENT_TYPES: Final = (ANOMALY, NO_DATA, INCIDENT)
_INT_EVENT_FIELDS: Final = frozenset(
    {
        "timestamp",
        "resumed_timestamp",
        "series_count",
        "onset_count",
        "first_onset",
        "last_onset",
        "window_seconds",
        "min_series",
    }
)
_FLOAT_EVENT_FIELDS: Final = frozenset(
    {
        "value",
        "mean",
        "std",
        "lower",
        "upper",
        "score",
        "detected_at",
        "expected",
        "severity",
        "detector_score",
        "base_score",
        "last_seen_at",
        "silent_seconds",
        "threshold_seconds",
        "cadence_seconds",
        "opened_at",
        "closed_at",
    }
)


def event_type(fields: Mapping[str, Any]) -> str:
    """An event's type; one without a `type` field is an anomaly."""
    return str(fields.get("type") or ANOMALY)


def wanted(fields: Mapping[str, Any], types: frozenset[str], series_id: str | None) -> bool:
    """Whether a subscriber asking for ``types`` (and one series, unless None) wants it; an
    incident, which names no series, is for subscribers to every series."""
    return event_type(fields) in types and (
        series_id is None or fields.get("series_id") == series_id
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
    """The `anomalies` entry of an anomalous reading: the contract's fields, ``type``, then
    ``extra`` (episode_id …), which consumers that do not know them ignore."""
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
        "type": ANOMALY,
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
