"""Feedback on detections, turned into a per-series adjustment of the stream's thresholds.

One pure function, ``adjustment``, is the rule: the service applies its result to a series'
stream state (``detector.kinds.seasonal.apply_adjustment``) and the offline evaluation
(``evaluation.feedback``) replays NAB through the same function, so the figures measured are
those of the rule the workers run.

**The rule.** A series' feedback, in the order it was given, moves one scale per test of the
stateful kinds (point, shift, divergence), each starting at 1:

- ``false_positive`` of an alert whose test was T multiplies T's scale by ``widen``: the test
  that fired, and only it, needs a larger statistic to fire again on that series (an alert of
  an unknown test, e.g. the μ ± kσ rule's ``threshold``, widens all three);
- ``missed`` (a time range with no alert) multiplies every scale by ``narrow``: what the
  series' user calls an anomaly was not surprising enough for any test;
- ``true_positive`` changes nothing: the thresholds did what was asked of them.

Each step is clipped to [``min_scale``, ``max_scale``], so no amount of feedback silences a
test or makes it fire on noise. The thresholds in force are the version's own, times the
scales. Because every step is a monotone map of the scale, a false positive added anywhere in
a history never lowers a scale, and a missed range never raises one (property-tested).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any, Final, Literal, get_args

Label = Literal["false_positive", "true_positive", "missed"]
LABELS: Final[tuple[str, ...]] = get_args(Label)
# The tests a scale applies to, by the names events carry in ``test``.
TESTS: Final = ("point", "shift", "divergence")


@dataclass(frozen=True, slots=True)
class FeedbackRule:
    """The rule's constants. The defaults are the best standard-profile NAB score of the
    evaluation's grid (``FEEDBACK_GRID`` in ``evaluation.__main__``), in-sample; the
    leave-one-folder-out figure, which chooses them without the folder it scores, is the
    honest one (docs/detection-quality.md)."""

    widen: float = 1.25
    narrow: float = 0.85
    max_scale: float = 1.5
    min_scale: float = 0.8

    def __post_init__(self) -> None:
        if not (self.widen >= 1.0 and 0.0 < self.narrow <= 1.0):
            raise ValueError("widen must be >= 1 and narrow in (0, 1]")
        if not (0.0 < self.min_scale <= 1.0 <= self.max_scale < float("inf")):
            raise ValueError("need 0 < min_scale <= 1 <= max_scale < inf")


DEFAULT_RULE: Final = FeedbackRule()


@dataclass(frozen=True, slots=True)
class Feedback:
    """What the rule reads of one piece of feedback: its label and, for a false or true
    positive, the test that fired on the alert it judges (``None`` or another name: unknown)."""

    label: Label
    test: str | None = None


@dataclass(frozen=True, slots=True)
class Adjustment:
    """Per-test threshold scales of one series (1.0: the version's own threshold)."""

    point: float = 1.0
    shift: float = 1.0
    divergence: float = 1.0

    @property
    def identity(self) -> bool:
        return self.point == self.shift == self.divergence == 1.0

    def scales(self) -> tuple[float, float, float]:
        return self.point, self.shift, self.divergence

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Adjustment:
        return cls(**{name: float(data.get(name, 1.0)) for name in TESTS})


IDENTITY: Final = Adjustment()


def _clip(value: float, rule: FeedbackRule) -> float:
    return min(max(value, rule.min_scale), rule.max_scale)


def step(current: Adjustment, item: Feedback, rule: FeedbackRule = DEFAULT_RULE) -> Adjustment:
    """The adjustment after one more piece of feedback."""
    scales = current.to_dict()
    if item.label == "false_positive":
        fired = [item.test] if item.test in TESTS else list(TESTS)
        for name in fired:
            scales[name] = _clip(scales[name] * rule.widen, rule)
    elif item.label == "missed":
        for name in TESTS:
            scales[name] = _clip(scales[name] * rule.narrow, rule)
    elif item.label != "true_positive":
        raise ValueError(f"unknown feedback label {item.label!r}: one of {', '.join(LABELS)}")
    return Adjustment(**scales)


def adjustment(history: Iterable[Feedback], rule: FeedbackRule = DEFAULT_RULE) -> Adjustment:
    """A series' adjustment from its feedback, oldest first."""
    current = IDENTITY
    for item in history:
        current = step(current, item, rule)
    return current
