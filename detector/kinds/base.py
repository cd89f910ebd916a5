"""The detector-kind interface: fit training data, score a batch, and (stateful kinds) fold
readings into per-series state and merge states.

Every front end goes through it: REST predict and batch predict, ``/plot``, both stream
transports (``detector.pipeline``) and the offline evaluation. A kind is one module under
``detector/kinds/`` plus one line in ``detector.kinds.registry``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, get_args

import numpy as np
import numpy.typing as npt

from detector.kinds.training import FloatArray, TrainingData

if TYPE_CHECKING:
    from detector.kinds.static import StaticModel

BoolArray = npt.NDArray[np.bool_]
Direction = Literal["above", "below", "both"]
DIRECTIONS: tuple[str, ...] = get_args(Direction)


@dataclass(frozen=True, slots=True)
class FitOptions:
    """What a fit request may set; every kind stores k and direction with the version."""

    sigma: float = 3.0
    direction: Direction = "above"


@dataclass(frozen=True, slots=True)
class Fitted:
    """A fit's outcome: the version's stateless rule (μ, σ, k, direction, tagged with the
    kind) and the kind's own parameters and initial state (``model_versions.params``)."""

    model: StaticModel
    params: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Verdicts:
    """Per reading of a scored batch: the outcome and its explanation.

    ``expected`` is the value the kind expected, ``lower`` and ``upper`` the bounds in force
    at that instant, ``score`` the signed z against the baseline, ``test`` which test fired
    ("" when none did).
    """

    anomaly: BoolArray
    expected: FloatArray
    lower: FloatArray
    upper: FloatArray
    score: FloatArray
    test: tuple[str, ...]


class DetectorKind(Protocol):
    """A detector kind. Stateless scoring (``score``) is what a single call without stream
    context uses: REST predict, batch predict, ``/plot`` and readings pinned to a version."""

    name: ClassVar[str]
    stateful: ClassVar[bool]

    def fit(self, data: TrainingData, options: FitOptions) -> Fitted: ...

    def score(self, model: StaticModel, values: FloatArray) -> Verdicts: ...


class StatefulKind(DetectorKind, Protocol):
    """A kind whose stream verdicts depend on the series' history: its state lives per series
    (``detector.state.series``), starts from the version's fitted ``params`` and is folded
    one reading at a time, in event-time order."""

    def initial_state(self, params: dict[str, Any]) -> Any: ...

    def fold(self, state: Any, timestamp: float, value: float) -> StreamVerdict: ...

    def merge(self, a: Any, b: Any) -> Any: ...


@dataclass(frozen=True, slots=True)
class StreamVerdict:
    """One reading folded into a stateful kind's state."""

    anomaly: bool
    alert: bool  # opens an alert of the kind's own grouping (an episode onset)
    expected: float
    std: float
    lower: float
    upper: float
    score: float  # signed z against the baseline the reading was judged by
    severity: float  # the kind's own statistic relative to its threshold (> 1: anomalous)
    test: str
