"""The detection model: fit μ and σ on training values, flag values beyond μ ± kσ.

Pure numpy, no I/O. One scoring implementation serves the REST API (single and batch) and the
stream worker. Model kinds are pluggable through ``MODEL_KINDS``; ``static`` is the seed's rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Literal, get_args

import numpy as np
import numpy.typing as npt

from detector.errors import InvalidTrainingDataError, TooLargeError

Direction = Literal["above", "below", "both"]
DIRECTIONS: tuple[str, ...] = get_args(Direction)
FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

# Largest timestamp we accept: int64 seconds, far beyond any real date.
_MAX_TIMESTAMP = 2**62


@dataclass(frozen=True, slots=True)
class TrainingData:
    """Validated training points, sorted by timestamp."""

    timestamps: IntArray
    values: FloatArray

    def __len__(self) -> int:
        return int(self.values.shape[0])


@dataclass(frozen=True, slots=True)
class Scores:
    """Per-point outcome of scoring values against one model."""

    anomaly: npt.NDArray[np.bool_]
    score: FloatArray  # signed z: (value − μ) / σ
    lower: float  # μ − kσ, whatever the direction
    upper: float  # μ + kσ, whatever the direction


@dataclass(frozen=True, slots=True)
class StaticModel:
    """The seed's model: anomalous iff the value crosses μ + kσ (or μ − kσ, or either)."""

    kind: ClassVar[str] = "static"
    mean: float
    std: float
    sigma: float = 3.0
    direction: Direction = "above"

    @property
    def lower(self) -> float:
        return self.mean - self.sigma * self.std

    @property
    def upper(self) -> float:
        return self.mean + self.sigma * self.std

    def is_anomaly(self, value: float) -> bool:
        """Score one value; the same rule as ``score`` without array overhead."""
        return bool(_flag(value, self.mean, self.std, self.sigma, self.direction))

    def score(self, values: FloatArray) -> Scores:
        """Score many values at once (vectorised)."""
        values = np.asarray(values, dtype=np.float64)
        return Scores(
            anomaly=np.asarray(_flag(values, self.mean, self.std, self.sigma, self.direction)),
            score=(values - self.mean) / self.std,
            lower=self.lower,
            upper=self.upper,
        )

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **asdict(self)}


def _flag(values: Any, mean: float, std: float, sigma: float, direction: str) -> Any:
    """The rule itself, written once for scalars and arrays: strict inequalities."""
    upper, lower = mean + sigma * std, mean - sigma * std
    if direction == "above":
        return values > upper
    if direction == "below":
        return values < lower
    # |value − μ| > kσ, written against the same rounded bounds that events report
    return (values > upper) | (values < lower)


@dataclass(frozen=True, slots=True)
class MultiscaleModel(StaticModel):
    """The ``multiscale`` kind (``detector.detectors``): its streaming state lives per series
    in Redis (``detector.multiscale_stream``) and its initial state in PostgreSQL
    (``model_versions.params``). The fields here are the training data's μ, σ and the fit's k
    and direction: the stateless rule that ``POST /predict``, the batch endpoint, ``/plot`` and
    readings pinned to this version use, since a single call has no stream context."""

    kind: ClassVar[str] = "multiscale"


MODEL_KINDS: dict[str, type[StaticModel]] = {"static": StaticModel, "multiscale": MultiscaleModel}
ModelKind = Literal["static", "multiscale"]


def model_from_dict(data: dict[str, Any]) -> StaticModel:
    """Rebuild a model from its stored form (JSON in Redis, a row in PostgreSQL)."""
    kind = data.get("kind", "static")
    cls = MODEL_KINDS[kind]
    return cls(
        mean=float(data["mean"]),
        std=float(data["std"]),
        sigma=float(data["sigma"]),
        direction=data["direction"],
    )


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
    vals = _as_values(values)
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


def fit_static(
    data: TrainingData, *, sigma: float = 3.0, direction: Direction = "above"
) -> StaticModel:
    """μ and population σ (ddof=0) in float64.

    numpy's mean uses pairwise summation and ``std`` subtracts the mean before squaring, so
    values like 1e9 + small noise keep their σ.
    """
    if not (sigma > 0 and np.isfinite(sigma)):
        raise InvalidTrainingDataError("sigma must be a finite number greater than 0")
    if direction not in DIRECTIONS:
        raise InvalidTrainingDataError(f"direction must be one of {', '.join(DIRECTIONS)}")
    with np.errstate(over="ignore", invalid="ignore"):
        mean = float(np.mean(data.values))
        std = float(np.std(data.values))
    if not (
        np.isfinite(mean)
        and np.isfinite(std)
        and np.isfinite(mean + sigma * std)
        and np.isfinite(mean - sigma * std)
    ):
        raise InvalidTrainingDataError(
            "values are too large: their mean and spread overflow a 64-bit float"
        )
    if std == 0.0:  # distinct values whose spread underflows a float64
        raise InvalidTrainingDataError(
            "values are constant or nearly so (standard deviation 0): "
            "the kσ rule would flag every change"
        )
    return StaticModel(mean=mean, std=std, sigma=float(sigma), direction=direction)


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
        if raw.size and (raw.min() < 0 or raw.max() > _MAX_TIMESTAMP):
            raise InvalidTrainingDataError(_TIMESTAMP_RULE)
        ts = raw.astype(np.int64)
    else:  # object (ints beyond int64), strings …
        raise InvalidTrainingDataError(_TIMESTAMP_RULE)
    if ts.size and (ts.min() < 0 or ts.max() > _MAX_TIMESTAMP):
        raise InvalidTrainingDataError(_TIMESTAMP_RULE)
    return ts


def _as_values(values: Sequence[float] | npt.NDArray[Any]) -> FloatArray:
    try:
        vals = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        raise InvalidTrainingDataError("values must be finite numbers") from None
    if vals.ndim != 1 or not np.all(np.isfinite(vals)):
        raise InvalidTrainingDataError("values must be finite numbers (no NaN or infinity)")
    return vals


_TIMESTAMP_RULE = "timestamps must be non-negative integers (Unix seconds)"
