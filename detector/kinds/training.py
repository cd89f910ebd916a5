"""Training data: the rules every fit's points obey, and the one timestamp bound."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from detector.errors import InvalidTrainingDataError, TooLargeError

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

# Largest timestamp accepted anywhere (fit, predict, stream): int64 seconds, far beyond any
# real date, with headroom so that adding a quiet period or a window never overflows.
MAX_TIMESTAMP: Final = 2**62
# Largest |value| a fit takes: beyond about 1.3e154, (x − μ)² overflows float64 whatever the
# spread; 1e150 leaves room for k·σ. Scoring takes any finite value.
MAX_FIT_VALUE: Final = 1e150


@dataclass(frozen=True, slots=True)
class TrainingData:
    """Validated training points, sorted by timestamp."""

    timestamps: IntArray
    values: FloatArray

    def __len__(self) -> int:
        return int(self.values.shape[0])


def prepare_training_data(
    timestamps: Sequence[int | float] | npt.NDArray[Any],
    values: Sequence[float] | npt.NDArray[Any],
    *,
    min_points: int = 3,
    max_points: int = 5_000_000,
) -> TrainingData:
    """Check training points against every rule and return them sorted by timestamp.

    Raises InvalidTrainingDataError (a 422) saying which rule failed, or TooLargeError (413).
    """
    n_ts, n_values = len(timestamps), len(values)
    if n_ts != n_values:
        raise InvalidTrainingDataError(
            f"timestamps and values must have the same length (got {n_ts} and {n_values})"
        )
    if n_values > max_points:
        raise TooLargeError(f"a fit takes at most {max_points} points (got {n_values})")
    if n_values < min_points:
        raise InvalidTrainingDataError(f"a fit needs at least {min_points} points (got {n_values})")
    ts = as_timestamps(timestamps)
    vals = as_values(values)
    if vals.size and float(np.max(np.abs(vals))) > MAX_FIT_VALUE:
        worst = float(vals[np.argmax(np.abs(vals))])
        raise InvalidTrainingDataError(
            f"values are too large to fit: each must be within ±1e150 (got {worst:g})"
        )
    order = np.argsort(ts, kind="stable")
    ts, vals = ts[order], vals[order]
    duplicated = np.flatnonzero(ts[1:] == ts[:-1])
    if duplicated.size:
        raise InvalidTrainingDataError(
            f"timestamps must be unique: {int(ts[duplicated[0]])} appears more than once"
        )
    if np.all(vals == vals[0]):
        raise InvalidTrainingDataError(
            "values are constant (standard deviation 0): the kσ rule would flag every change"
        )
    return TrainingData(timestamps=ts, values=vals)


def as_timestamps(timestamps: Sequence[int | float] | npt.NDArray[Any]) -> IntArray:
    """Timestamps as int64 Unix seconds; integral floats count as integers."""
    try:
        raw = np.asarray(timestamps)
    except OverflowError:
        raise InvalidTrainingDataError(_TIMESTAMP_RULE) from None
    if raw.dtype == np.bool_ or raw.ndim != 1:
        raise InvalidTrainingDataError(_TIMESTAMP_RULE)
    if raw.dtype.kind in "iu":
        ts = raw.astype(np.int64, copy=False)
    elif raw.dtype.kind == "f":
        # A JSON number with no fractional part (1.0) counts as that integer.
        if not np.all(np.isfinite(raw)) or not np.all(raw == np.floor(raw)):
            raise InvalidTrainingDataError(_TIMESTAMP_RULE)
        if raw.size and (raw.min() < 0 or raw.max() > MAX_TIMESTAMP):
            raise InvalidTrainingDataError(_TIMESTAMP_RULE)
        ts = raw.astype(np.int64)
    else:  # object (ints beyond int64), strings …
        raise InvalidTrainingDataError(_TIMESTAMP_RULE)
    if ts.size and (ts.min() < 0 or ts.max() > MAX_TIMESTAMP):
        raise InvalidTrainingDataError(_TIMESTAMP_RULE)
    return ts


def as_values(values: Sequence[float] | npt.NDArray[Any]) -> FloatArray:
    """Values as float64, every one finite."""
    try:
        vals = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        raise InvalidTrainingDataError("values must be finite numbers") from None
    if vals.ndim != 1 or not np.all(np.isfinite(vals)):
        raise InvalidTrainingDataError("values must be finite numbers (no NaN or infinity)")
    return vals


_TIMESTAMP_RULE = "timestamps must be non-negative integers (Unix seconds)"
