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
_INT_EVENT_FIELDS: Final = frozenset({"timestamp"})
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
    }
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
