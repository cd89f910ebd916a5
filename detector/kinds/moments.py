"""Mergeable, order-independent running moments (Chan's merge), plain and exponentially decaying."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class Moments:
    """Weighted count, mean and M2 (Σ w·(x − mean)²) of a set of values.

    Two states merge exactly (Chan et al.'s parallel update), so workers can each fold their
    batches and combine them in any order; memory is three floats however many readings.
    Keeping the mean and the centred M2, never Σx², keeps 1e9 + small noise accurate.
    """

    weight: float = 0.0
    mean: float = 0.0
    m2: float = 0.0

    @classmethod
    def of(cls, values: Any, weights: Any = None) -> Moments:
        """Moments of a batch (two passes over it: the mean first, then centred squares)."""
        x = np.asarray(values, dtype=np.float64).ravel()
        w = np.ones_like(x) if weights is None else np.asarray(weights, dtype=np.float64).ravel()
        if x.shape != w.shape:
            raise ValueError("values and weights must have the same length")
        if not (np.all(np.isfinite(x)) and np.all(np.isfinite(w)) and np.all(w >= 0)):
            raise ValueError("values must be finite and weights finite and non-negative")
        total = float(np.sum(w))
        if total == 0.0:
            return cls()
        mean = float(np.sum(w * x) / total)
        # A second pass around the first mean removes its rounding error (corrected two-pass).
        mean += float(np.sum(w * (x - mean)) / total)
        return cls(total, mean, float(np.sum(w * (x - mean) ** 2)))

    @property
    def variance(self) -> float:
        """Population variance (ddof = 0, as the static model's σ); NaN when empty."""
        return self.m2 / self.weight if self.weight > 0.0 else math.nan

    @property
    def std(self) -> float:
        return math.sqrt(self.variance)

    def merge(self, other: Moments) -> Moments:
        """The moments of the union of both sets (commutative; associative up to rounding)."""
        if other.weight == 0.0:
            return self
        if self.weight == 0.0:
            return other
        total = self.weight + other.weight
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.weight / total)
        m2 = self.m2 + other.m2 + delta * delta * (self.weight * other.weight / total)
        return Moments(total, mean, m2)

    def update_batch(self, values: Any) -> Moments:
        return self.merge(Moments.of(values))

    def scaled(self, factor: float) -> Moments:
        """Every weight multiplied by ``factor``: the mean and variance do not change."""
        if factor == 0.0 or self.weight * factor == 0.0:  # underflow: nothing left to remember
            return Moments()
        return Moments(self.weight * factor, self.mean, self.m2 * factor)

    def to_dict(self) -> dict[str, float]:
        return {"weight": self.weight, "mean": self.mean, "m2": self.m2}


def fit_readings(timestamps: Any, values: Any) -> tuple[FloatArray, FloatArray, float]:
    """A streaming kind's fit readings as float arrays, checked, with their cadence: the
    median positive interval between sorted timestamps (1 s when there is none)."""
    ts = np.asarray(timestamps, dtype=np.float64).ravel()
    xs = np.asarray(values, dtype=np.float64).ravel()
    if ts.size != xs.size or ts.size < 2:
        raise ValueError("fit needs at least two readings with one timestamp each")
    if not (np.all(np.isfinite(ts)) and np.all(np.isfinite(xs))):
        raise ValueError("timestamps and values must be finite")
    cadence = median_interval(ts)
    return ts, xs, 1.0 if cadence is None else cadence


def median_interval(timestamps: Any) -> float | None:
    """A series' cadence: the median positive interval between its sorted timestamps, None
    when they are all the same (training data comes sorted: no sort then)."""
    ts = np.asarray(timestamps, dtype=np.float64).ravel()
    gaps = np.diff(ts)
    if gaps.size and float(gaps.min()) < 0:
        gaps = np.diff(np.sort(ts))
    positive = gaps[gaps > 0]
    return float(np.median(positive)) if positive.size else None


@dataclass(frozen=True, slots=True)
class DecayingMoments:
    """Moments in which a reading at time t weighs 2^(−(T − t)/half_life) at time T.

    The state is anchored at ``time`` (the latest event time folded in); merging first brings
    both states to the later anchor, so the result depends on the set of readings and their
    event times, not on arrival order or batching: late readings simply weigh less. A long gap
    decays the weight to 0 and the state forgets. Memory: four floats.
    """

    half_life: float
    moments: Moments = Moments()
    time: float = -math.inf

    def __post_init__(self) -> None:
        if not (self.half_life > 0 and math.isfinite(self.half_life)):
            raise ValueError("half_life must be a positive number of seconds")

    @classmethod
    def of(cls, timestamps: Any, values: Any, half_life: float) -> DecayingMoments:
        ts = np.asarray(timestamps, dtype=np.float64).ravel()
        if ts.size == 0:
            return cls(half_life)
        anchor = float(np.max(ts))
        weights = np.exp2(-(anchor - ts) / half_life)
        return cls(half_life, Moments.of(values, weights), anchor)

    @property
    def weight(self) -> float:
        return self.moments.weight

    @property
    def mean(self) -> float:
        return self.moments.mean

    @property
    def std(self) -> float:
        return self.moments.std

    def decayed_to(self, time: float) -> DecayingMoments:
        """The state seen from a later event time (never moves the anchor back)."""
        if time <= self.time:
            return self
        if self.time == -math.inf:
            return DecayingMoments(self.half_life, self.moments, time)
        factor = math.exp2(-(time - self.time) / self.half_life)
        return DecayingMoments(self.half_life, self.moments.scaled(factor), time)

    def merge(self, other: DecayingMoments) -> DecayingMoments:
        if other.half_life != self.half_life:
            raise ValueError("cannot merge states with different half-lives")
        anchor = max(self.time, other.time)
        a, b = self.decayed_to(anchor), other.decayed_to(anchor)
        return DecayingMoments(self.half_life, a.moments.merge(b.moments), anchor)

    def update_batch(self, timestamps: Any, values: Any) -> DecayingMoments:
        return self.merge(DecayingMoments.of(timestamps, values, self.half_life))

    def update_one(self, timestamp: float, value: float) -> DecayingMoments:
        """``update_batch`` for a single reading, in plain float arithmetic (the hot path)."""
        if timestamp >= self.time:
            state, weight = self.decayed_to(timestamp), 1.0
        else:  # a late reading: it arrives already decayed
            state, weight = self, math.exp2(-(self.time - timestamp) / self.half_life)
        if weight == 0.0:
            return state
        return DecayingMoments(
            self.half_life, state.moments.merge(Moments(weight, float(value), 0.0)), state.time
        )

    def to_dict(self) -> dict[str, float]:
        return {"half_life": self.half_life, "time": self.time, **self.moments.to_dict()}
