"""The ``static`` kind: the seed's rule, μ and σ of the training values, flag beyond μ ± kσ.

Pure numpy, no I/O. The rule is written once (``flag``) for scalars and arrays; REST predict,
batch predict, ``/plot``, both stream transports and the offline evaluation call it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Literal, get_args

import numpy as np
import numpy.typing as npt

from detector.errors import InvalidTrainingDataError
from detector.kinds.training import FloatArray, TrainingData

Direction = Literal["above", "below", "both"]
DIRECTIONS: tuple[str, ...] = get_args(Direction)


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
        return bool(flag(value, self.mean, self.std, self.sigma, self.direction))

    def score(self, values: FloatArray) -> Scores:
        """Score many values at once (vectorised)."""
        values = np.asarray(values, dtype=np.float64)
        return Scores(
            anomaly=np.asarray(flag(values, self.mean, self.std, self.sigma, self.direction)),
            score=(values - self.mean) / self.std,
            lower=self.lower,
            upper=self.upper,
        )

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **asdict(self)}


def flag(values: Any, mean: float, std: float, sigma: float, direction: str) -> Any:
    """The rule itself, written once for scalars and arrays: strict inequalities."""
    upper, lower = mean + sigma * std, mean - sigma * std
    if direction == "above":
        return values > upper
    if direction == "below":
        return values < lower
    # |value − μ| > kσ, written against the same rounded bounds that events report
    return (values > upper) | (values < lower)


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


