"""Feedback on detections, turned into a per-series adjustment of the stream's thresholds.

One pure function, ``adjustment``, is the rule: the service folds its result into a series'
stream state (``detector.kinds.seasonal.with_adjustment``) and the offline evaluation
(``evaluation.feedback``) replays NAB through the same function, so the figures measured are
those of the rule the workers run.

**The rule.** A series' feedback, in the order it was given, moves three things per test of
the stateful kinds (point, shift, divergence):

- a **fading multiple**, starting at 1. ``false_positive`` of an alert whose test was T
  multiplies T's by ``widen`` (an alert of an unknown test, e.g. the μ ± kσ rule's
  ``threshold``, widens all three); ``missed`` (a time range with no alert) multiplies all
  three by ``narrow``. Between pieces of feedback the multiple fades towards 1 in event time,
  its logarithm halving every ``half_life`` seconds: false alerts that keep coming keep a
  threshold wide, a burst of them long ago stops costing the series its later anomalies.
- an **hour multiple** per UTC hour of the day, starting at 1: a false alert of T at hour h
  also multiplies T's multiple at that hour by ``hour_widen``, for good. Alerts that recur at
  one time of day (a nightly job, a daily report) are silenced where they happen, not
  everywhere.
- a **cap**: never more than ``margin`` times the strongest false alert of T seen (its
  ``base_score``, the statistic over the version's own threshold), and never below the
  version's threshold. What was marked false is suppressed; a reading stronger than anything
  marked false still fires.

``true_positive`` changes nothing: the thresholds did what was asked of them. A test's
multiple in force at time t and UTC hour h is ``min(fading(t) · hour[h], cap, max_scale)``,
where ``fading(t) = exp(log(m) · 2^(−(t − time)/half_life))`` for the fading multiple m at
``time`` (the event time of the latest feedback). Every multiple stays in [``min_scale``,
``max_scale``]. With feedback given in event-time order, a false positive added anywhere in
a history never lowers a multiple, at any later time or hour, and a missed range never raises
one (property-tested). Feedback without an event time acts at the latest one seen; a false
positive without a level (recorded before levels were) leaves the cap as it is. An infinite
``half_life``, an ``hour_widen`` of 1 and an infinite ``margin`` make it static per-test
scales, clipped to [``min_scale``, ``max_scale``] at each step.

The thresholds in force are the version's own times the multiples. What the workers need is
``Adjustment.vector()``, a fixed layout of floats (``VECTOR_LENGTH``) the seasonal kind keeps
after its state row and reads for each reading it folds.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final, Literal, get_args

Label = Literal["false_positive", "true_positive", "missed"]
LABELS: Final[tuple[str, ...]] = get_args(Label)
# The tests a multiple applies to, by the names events carry in ``test``.
TESTS: Final = ("point", "shift", "divergence")
HOURS: Final = 24
HOUR: Final = 3600.0
DAY: Final = 86_400.0

# ``Adjustment.vector()``'s layout: the event time the fading multiples are at (NaN: none),
# the half-life in seconds (inf: they never fade), the ceiling, the fading multiples' natural
# logarithms, the caps (0: none), then each test's 24 hour multiples.
V_TIME: Final = 0
V_HALF_LIFE: Final = 1
V_CEILING: Final = 2
V_LOG: Final = 3
V_CAP: Final = V_LOG + len(TESTS)
V_HOURS: Final = V_CAP + len(TESTS)
VECTOR_LENGTH: Final = V_HOURS + len(TESTS) * HOURS


@dataclass(frozen=True, slots=True)
class FeedbackRule:
    """The rule's constants. The defaults are the best standard-profile NAB score of the
    evaluation's grid (``FEEDBACK_GRID`` in ``evaluation.__main__``), in-sample; the
    leave-one-folder-out figure, which chooses them without the folder it scores, is the
    honest one (docs/detection-quality.md)."""

    widen: float = 1.25
    half_life: float = 30 * DAY
    hour_widen: float = 2.0
    margin: float = 1.2
    narrow: float = 0.85
    max_scale: float = 3.0
    min_scale: float = 0.8

    def __post_init__(self) -> None:
        if not (self.widen >= 1.0 and self.hour_widen >= 1.0 and 0.0 < self.narrow <= 1.0):
            raise ValueError("widen and hour_widen must be >= 1 and narrow in (0, 1]")
        if not (0.0 < self.min_scale <= 1.0 <= self.max_scale < math.inf):
            raise ValueError("need 0 < min_scale <= 1 <= max_scale < inf")
        if not (self.half_life > 0.0 and self.margin >= 1.0):
            raise ValueError("need half_life > 0 (inf: no fading) and margin >= 1")


DEFAULT_RULE: Final = FeedbackRule()


@dataclass(frozen=True, slots=True)
class Feedback:
    """What the rule reads of one piece of feedback: its label; for a false or true positive,
    the test that fired on the alert it judges (``None`` or another name: unknown) and that
    test's ``level`` there (the opener's ``base_score``; None: unknown); and its event
    ``time``, the opener's timestamp or a missed range's end (None: unknown)."""

    label: Label
    test: str | None = None
    time: float | None = None
    level: float | None = None


@dataclass(frozen=True, slots=True)
class Adjustment:
    """One series' adjustment: per test, the fading multiple at ``time`` (``point``,
    ``shift``, ``divergence``; 1.0: the version's own threshold), the cap (``caps``, 0: none)
    and the 24 hour multiples (``hours``, one tuple per test; empty: all 1). Fields that
    change no threshold keep their defaults (no ``half_life`` without a ``time``, no
    ``ceiling`` without hours), so equal adjustments compare equal."""

    point: float = 1.0
    shift: float = 1.0
    divergence: float = 1.0
    caps: tuple[float, float, float] = (0.0, 0.0, 0.0)
    hours: tuple[tuple[float, ...], ...] = ()
    time: float | None = None
    half_life: float = math.inf
    ceiling: float = math.inf

    @property
    def identity(self) -> bool:
        return self == IDENTITY

    def scales(self) -> tuple[float, float, float]:
        """The fading multiples at ``time``, before caps and hours."""
        return self.point, self.shift, self.divergence

    def multiple(self, test: int, t: float | None = None, hour: int | None = None) -> float:
        """Test ``test``'s (an index into TESTS) multiple in force at event time ``t`` (None:
        ``time``) and UTC ``hour`` (None: outside the hours marked). The seasonal fold
        computes the same from ``vector()``."""
        m = self.scales()[test]
        if t is not None and self.time is not None and t > self.time:
            m = math.exp(math.log(m) * 2.0 ** (-(t - self.time) / self.half_life))
        if hour is not None and self.hours:
            m *= self.hours[test][hour]
        if self.caps[test] > 0.0:
            m = min(m, self.caps[test])
        return min(m, self.ceiling)

    def in_force(self) -> dict[str, float]:
        """Each test's multiple at the latest feedback's time, outside the hours marked: what
        the API answers as ``adjustment``."""
        return {name: self.multiple(i) for i, name in enumerate(TESTS)}

    def vector(self) -> tuple[float, ...]:
        """The layout the seasonal fold reads (``VECTOR_LENGTH`` floats); () for the identity,
        which leaves a state as the version made it."""
        return () if self.identity else self.layout()

    def layout(self) -> tuple[float, ...]:
        """``vector()``'s layout, also for the identity."""
        hours = self.hours or tuple((1.0,) * HOURS for _ in TESTS)
        return (
            math.nan if self.time is None else float(self.time),
            self.half_life,
            self.ceiling,
            *(math.log(m) for m in self.scales()),
            *self.caps,
            *(h for per_test in hours for h in per_test),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe (an infinite half-life or ceiling is null); ``from_dict`` reads it."""
        return {
            "point": self.point,
            "shift": self.shift,
            "divergence": self.divergence,
            "caps": list(self.caps),
            "hours": [list(h) for h in self.hours],
            "time": self.time,
            "half_life": None if math.isinf(self.half_life) else self.half_life,
            "ceiling": None if math.isinf(self.ceiling) else self.ceiling,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Adjustment:
        caps = tuple(float(c) for c in data.get("caps") or (0.0, 0.0, 0.0))
        hours = tuple(tuple(float(h) for h in per_test) for per_test in data.get("hours") or ())
        if len(caps) != len(TESTS) or (
            hours and (len(hours) != len(TESTS) or any(len(h) != HOURS for h in hours))
        ):
            raise ValueError("an adjustment has 3 caps and none or 3 x 24 hour multiples")
        time, half_life, ceiling = (data.get(k) for k in ("time", "half_life", "ceiling"))
        point, shift, divergence = (float(data.get(name, 1.0)) for name in TESTS)
        return cls(
            point,
            shift,
            divergence,
            caps=(caps[0], caps[1], caps[2]),
            hours=hours,
            time=None if time is None else float(time),
            half_life=math.inf if half_life is None else float(half_life),
            ceiling=math.inf if ceiling is None else float(ceiling),
        )

    @classmethod
    def from_scales(cls, scales: Sequence[float]) -> Adjustment:
        """Three static multiples (what the API wrote before fading, hours and caps)."""
        point, shift, divergence = (float(s) for s in scales)
        return cls(point, shift, divergence)


IDENTITY: Final = Adjustment()


def _clip(value: float, rule: FeedbackRule) -> float:
    return min(max(value, rule.min_scale), rule.max_scale)


def _at(current: Adjustment, time: float | None, rule: FeedbackRule) -> Adjustment:
    """``current`` with its fading multiples moved on to ``time`` (never backwards)."""
    if time is None or (current.time is not None and time <= current.time):
        return current
    if current.time is None:
        return replace(current, time=float(time), half_life=rule.half_life)
    faded = current.scales()
    if not math.isinf(rule.half_life):
        decay = 2.0 ** (-(time - current.time) / rule.half_life)
        faded = tuple(math.exp(math.log(m) * decay) for m in faded)  # type: ignore[assignment]
    return replace(current, point=faded[0], shift=faded[1], divergence=faded[2], time=float(time))


def step(current: Adjustment, item: Feedback, rule: FeedbackRule = DEFAULT_RULE) -> Adjustment:
    """The adjustment after one more piece of feedback."""
    if item.label == "true_positive":
        return current
    if item.label not in ("false_positive", "missed"):
        raise ValueError(f"unknown feedback label {item.label!r}: one of {', '.join(LABELS)}")
    now = _at(current, item.time, rule)
    scales = list(now.scales())
    if item.label == "missed":
        scales = [_clip(m * rule.narrow, rule) for m in scales]
        return replace(now, point=scales[0], shift=scales[1], divergence=scales[2])
    fired = [TESTS.index(item.test)] if item.test in TESTS else list(range(len(TESTS)))
    caps = list(now.caps)
    hours = [list(h) for h in now.hours]
    for j in fired:
        scales[j] = _clip(scales[j] * rule.widen, rule)
        if item.level is not None and len(fired) == 1 and not math.isinf(rule.margin):
            caps[j] = max(caps[j], rule.margin * item.level, 1.0)
    ceiling = now.ceiling
    if item.time is not None and rule.hour_widen > 1.0:
        hour = int(item.time // HOUR) % HOURS
        hours = hours or [[1.0] * HOURS for _ in TESTS]
        for j in fired:
            hours[j][hour] = min(hours[j][hour] * rule.hour_widen, rule.max_scale)
        ceiling = rule.max_scale
    return replace(
        now,
        point=scales[0],
        shift=scales[1],
        divergence=scales[2],
        caps=(caps[0], caps[1], caps[2]),
        hours=tuple(tuple(h) for h in hours),
        ceiling=ceiling,
    )


def adjustment(history: Iterable[Feedback], rule: FeedbackRule = DEFAULT_RULE) -> Adjustment:
    """A series' adjustment from its feedback, oldest first."""
    current = IDENTITY
    for item in history:
        current = step(current, item, rule)
    return current
