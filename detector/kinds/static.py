"""The ``static`` kind: the seed's rule, μ and σ of the training values, flag beyond μ ± kσ.

Pure numpy, no I/O. The rule is written once (``flag``), for one value or for a whole batch
with one row of bounds per reading; every front end scores through it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Final

import numpy as np

from detector.errors import InvalidTrainingDataError
from detector.kinds.base import DIRECTIONS, Direction, FitOptions, Fitted, Verdicts, signed_z
from detector.kinds.training import FloatArray, TrainingData

# Direction codes, for batches whose readings belong to models of different directions.
ABOVE: Final = 0
BELOW: Final = 1
BOTH: Final = 2
DIRECTION_CODES: Final = {"above": ABOVE, "below": BELOW, "both": BOTH}
# The largest k in μ ± kσ. Chebyshev: whatever the distribution, at most 1/k² of it lies beyond
# kσ, so k = 100 already flags at most 0.01% of any series; a larger k only silences a series
# (k = 1e308 makes every bound infinite) and is more likely a mistake than a choice.
MAX_SIGMA: Final = 100.0


def flag(values: Any, lower: Any, upper: Any, direction: Any) -> Any:
    """The rule itself: strict inequalities against μ − kσ and μ + kσ.

    Scalars or arrays that broadcast (a batch of readings with one row of bounds and one
    direction code each); ``direction`` is a code (``DIRECTION_CODES``).
    """
    above = values > upper
    below = values < lower
    if np.ndim(direction) == 0:
        if direction == ABOVE:
            return above
        return below if direction == BELOW else above | below
    return np.where(direction == ABOVE, above, np.where(direction == BELOW, below, above | below))


def judge(
    values: FloatArray, mean: Any, std: Any, lower: Any, upper: Any, direction: Any
) -> Verdicts:
    """``flag`` with its explanation, for a batch (parameters scalar or one per reading)."""
    values = np.asarray(values, dtype=np.float64)
    anomaly = np.asarray(flag(values, lower, upper, direction), dtype=bool)
    shape = values.shape
    return Verdicts(
        anomaly=anomaly,
        expected=np.broadcast_to(np.asarray(mean, dtype=np.float64), shape),
        lower=np.broadcast_to(np.asarray(lower, dtype=np.float64), shape),
        upper=np.broadcast_to(np.asarray(upper, dtype=np.float64), shape),
        score=signed_z(values, mean, std),
        test=("threshold",),
    )


@dataclass(frozen=True, slots=True)
class StaticModel:
    """A version's stateless rule: anomalous iff the value crosses μ + kσ (or μ − kσ, or
    either). Every kind keeps one (for a stateful kind, its training data's μ and σ)."""

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

    @property
    def direction_code(self) -> int:
        return DIRECTION_CODES[self.direction]

    def is_anomaly(self, value: float) -> bool:
        """Score one value (``flag`` on plain floats: no array overhead)."""
        return bool(flag(value, self.lower, self.upper, self.direction_code))

    def score(self, values: FloatArray) -> Verdicts:
        """Score many values at once (vectorised)."""
        return judge(values, self.mean, self.std, self.lower, self.upper, self.direction_code)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **asdict(self)}


def check_options(sigma: float, direction: str) -> None:
    """The rules of a fit's k and direction, whatever the points (a bulk fit checks its
    options once, before its first series)."""
    if not (0 < sigma <= MAX_SIGMA and np.isfinite(sigma)):
        raise InvalidTrainingDataError(
            f"sigma must be a number greater than 0 and at most {MAX_SIGMA:g}"
        )
    if direction not in DIRECTIONS:
        raise InvalidTrainingDataError(f"direction must be one of {', '.join(DIRECTIONS)}")


def fit_static(
    data: TrainingData, *, sigma: float = 3.0, direction: Direction = "above"
) -> StaticModel:
    """μ and population σ (ddof=0) in float64.

    numpy's mean uses pairwise summation and ``std`` subtracts the mean before squaring, so
    values like 1e9 + small noise keep their σ.
    """
    check_options(sigma, direction)
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


class StaticKind:
    """The seed's kind: fitted once, never updated; stream and REST give the same answer."""

    name: ClassVar[str] = "static"
    stateful: ClassVar[bool] = False

    def fit(self, data: TrainingData, options: FitOptions) -> Fitted:
        return Fitted(fit_static(data, sigma=options.sigma, direction=options.direction), {})

    def score(self, model: StaticModel, values: FloatArray) -> Verdicts:
        return model.score(values)
