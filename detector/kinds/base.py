"""The detector-kind interface: fit training data, score a batch, and (stateful kinds) fold
readings into per-series state and merge states.

Every front end goes through it: REST predict and batch predict, ``/plot``, both stream
transports (``detector.pipeline``) and the offline evaluation. A kind is one module under
``detector/kinds/`` plus one line in ``detector.kinds.registry``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Final, Literal, Protocol, get_args

import numpy as np
import numpy.typing as npt

from detector.kinds.training import FloatArray, TrainingData

if TYPE_CHECKING:
    from detector.kinds.static import StaticModel

BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.intp]
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
    (``detector.state.series``), starts from the version's fitted ``params`` and is folded in
    event-time order, many series at once."""

    def initial_state(self, params: dict[str, Any]) -> Any: ...

    def fold(
        self, states: Sequence[Any], rows: IntArray, timestamps: FloatArray, values: FloatArray
    ) -> tuple[list[Any], Folded]:
        """Fold readings into copies of ``states``: reading i belongs to ``states[rows[i]]``;
        each series' readings come in the order they are to be folded. Returns the new
        states and the verdicts, in the order the readings were given."""
        ...

    def baseline(
        self, params: dict[str, Any], timestamps: FloatArray
    ) -> tuple[FloatArray, FloatArray, FloatArray]:
        """The expected value and the lower and upper bounds the stream judges by at these
        instants, from the version's fitted state (what ``/plot`` draws)."""
        ...

    def encode_state(self, state: Any) -> Any:
        """The state as a JSON-ready value."""
        ...

    def prepare(self) -> None:
        """Load what folding needs (a compiler, say) ahead of the first fold, so that the
        first batch does not wait for it; idempotent and thread-safe (workers call it in a
        thread at start)."""
        ...

    def decode_state(self, data: Any) -> Any: ...


# The largest |score| any kind reports: a statistic for "infinitely surprising" (a change on a
# flat baseline, a reading so far from a tight one that its z overflows) that fits in JSON.
MAX_SCORE: Final = 1e9


def signed_z(values: Any, mean: Any, std: Any) -> Any:
    """The contract's signed z, (value − μ)/σ, clipped to ±MAX_SCORE so it stays finite."""
    with np.errstate(over="ignore"):
        return np.clip((np.asarray(values, dtype=np.float64) - mean) / std, -MAX_SCORE, MAX_SCORE)


# The tests a stateful kind's reading can fail, by ``Folded.test`` code (0: none fired).
TESTS: tuple[str, ...] = ("", "point", "shift", "divergence")


@dataclass(frozen=True, slots=True)
class Folded:
    """Per folded reading, in the order given to ``StatefulKind.fold``: the verdict and its
    explanation. ``expected`` and ``lower``/``upper`` are the value and bounds the kind used
    at that instant, ``score`` the signed z against its baseline, ``ratio`` the kind's largest
    statistic relative to its threshold (> 1: anomalous), ``test`` an index into TESTS.
    ``level`` (kinds whose thresholds feedback moves) is the statistic of the test that fired
    relative to the version's own threshold, which feedback judging the alert reads (None:
    ``ratio``, the thresholds being the version's)."""

    anomaly: BoolArray
    alert: BoolArray  # opens an alert of the kind's own grouping (an episode onset)
    expected: FloatArray
    std: FloatArray
    lower: FloatArray
    upper: FloatArray
    score: FloatArray
    ratio: FloatArray
    test: IntArray
    level: FloatArray | None = None


def severity(ratio: Any) -> Any:
    """0–100 from a statistic relative to its threshold, for every kind: 50 at the threshold,
    approaching 100 as the statistic grows (100·r/(1 + r)); 0 for no deviation."""
    r = np.maximum(np.asarray(ratio, dtype=np.float64), 0.0)
    # As 100 / (1 + 1/r): an infinite r (a k of 5e-324) is 100, where r / (1 + r) is NaN.
    with np.errstate(divide="ignore", over="ignore"):  # 1/0 and 1/5e-324 are inf: severity 0
        return 100.0 / (1.0 + 1.0 / r)
