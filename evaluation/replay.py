"""Offline, event-time replay of pluggable detector kinds over one series (no Redis)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

from detector.kinds.base import Direction
from detector.kinds.moments import DecayingMoments, Moments
from detector.kinds.multiscale import MultiscaleParams, MultiscaleState, group_alerts
from detector.kinds.static import DIRECTION_CODES, flag
from evaluation.nab import probationary_length

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

DAY = 86_400.0


def _exceeds(z: float, k: float, direction: Direction) -> bool:
    """The model's kσ rule (``detector.kinds.static.flag``) on a z score: in z units the
    bounds are ±k (NaN, from σ = 0, never exceeds)."""
    return bool(flag(z, -k, k, DIRECTION_CODES[direction]))


def _z(value: float, mean: float, std: float) -> float:
    if std > 0.0 and math.isfinite(std):
        return (value - mean) / std
    # A flat baseline: any change is infinitely surprising, no change is not.
    return 0.0 if value == mean else math.copysign(math.inf, value - mean)


class Baseline(Protocol):
    """A detector kind's per-series model: fitted once, then fed readings in arrival order."""

    def fit(self, timestamps: FloatArray, values: FloatArray) -> None: ...

    def observe(self, timestamp: float, value: float) -> float:
        """The reading's signed z against the model as it stood before the reading."""
        ...


@dataclass
class StaticBaseline:
    """The seed's model: μ, σ fitted once on the training points, never updated."""

    mean: float = 0.0
    std: float = 0.0

    def fit(self, timestamps: FloatArray, values: FloatArray) -> None:
        self.mean, self.std = float(np.mean(values)), float(np.std(values))

    def observe(self, timestamp: float, value: float) -> float:
        return _z(value, self.mean, self.std)


@dataclass
class RefitBaseline:
    """μ, σ refitted on everything seen so far every ``every`` seconds of event time.

    The running total is one mergeable ``Moments`` (O(1) memory), not the stored history.
    """

    every: float = DAY
    seen: Moments = field(default_factory=Moments)
    model: Moments = field(default_factory=Moments)
    next_refit: float = math.inf

    def fit(self, timestamps: FloatArray, values: FloatArray) -> None:
        self.seen = self.model = Moments.of(values)
        self.next_refit = float(np.max(timestamps)) + self.every

    def observe(self, timestamp: float, value: float) -> float:
        if timestamp >= self.next_refit:
            self.model = self.seen
            # The next refit falls on the schedule, however long the gap was.
            self.next_refit += self.every * math.floor(
                (timestamp - self.next_refit) / self.every + 1
            )
        self.seen = self.seen.merge(Moments(1.0, value, 0.0))
        return _z(value, self.model.mean, self.model.std)


@dataclass
class AdaptiveBaseline:
    """Exponentially decaying μ, σ (half-life in event time) that follows the series.

    Readings beyond ``learn_limit`` σ are learnt with weight 0 until the episode has lasted
    ``adopt_after`` seconds: a spike does not inflate σ, but a lasting level shift becomes the
    new normal.
    """

    half_life: float = 7 * DAY
    learn_limit: float = math.inf
    adopt_after: float = 0.0
    state: DecayingMoments = field(init=False)
    _outlying_since: float = field(init=False, default=math.nan)

    def __post_init__(self) -> None:
        self.state = DecayingMoments(self.half_life)

    def fit(self, timestamps: FloatArray, values: FloatArray) -> None:
        self.state = DecayingMoments.of(timestamps, values, self.half_life)

    def observe(self, timestamp: float, value: float) -> float:
        seen = self.state.decayed_to(timestamp)
        z = _z(value, seen.mean, seen.std)
        if abs(z) > self.learn_limit:
            if math.isnan(self._outlying_since):
                self._outlying_since = timestamp
            if timestamp - self._outlying_since < self.adopt_after:
                self.state = seen
                return z
        else:
            self._outlying_since = math.nan
        self.state = self.state.update_one(timestamp, value)
        return z


class Alerting(Protocol):
    """Turns per-reading anomalies into alerts."""

    def alert(self, timestamp: float, anomalous: bool) -> bool: ...


@dataclass
class EveryReading:
    """The seed's behaviour: every anomalous reading is an alert."""

    def alert(self, timestamp: float, anomalous: bool) -> bool:
        return anomalous


@dataclass
class Episodes:
    """One alert per episode: an anomalous reading opens an episode (its onset) unless one is
    open; the episode closes after ``quiet`` seconds of event time without an anomalous
    reading. With ``extend=False`` the quiet period runs from the onset instead ("no new
    alert for a day after the last alert")."""

    quiet: float = DAY
    extend: bool = True
    _last: float = -math.inf

    def alert(self, timestamp: float, anomalous: bool) -> bool:
        if not anomalous:
            return False
        onset = timestamp - self._last > self.quiet
        if onset or self.extend:
            self._last = max(self._last, timestamp)
        return onset


@dataclass(frozen=True, slots=True)
class DetectorKind:
    """A named combination of baseline, rule and alerting, with its parameters."""

    name: str
    make_baseline: Callable[[], Baseline]
    make_alerting: Callable[[], Alerting]
    k: float = 3.0
    direction: Direction = "above"
    # A self-contained streaming detector (its own rule and alert grouping) instead of a
    # baseline + kσ rule + alerting; fitted on the probationary rows.
    make_streaming: Callable[[FloatArray, FloatArray], MultiscaleState] | None = None


@dataclass(frozen=True, slots=True)
class Replay:
    """Per-row outcome of one series' replay (probationary rows: no anomaly, no alert)."""

    z: FloatArray
    anomaly: BoolArray
    alert: BoolArray

    @property
    def anomaly_scores(self) -> FloatArray:
        """NAB's ``anomaly_score`` column: 1.0 for an alert (an episode onset), else 0.0."""
        return self.alert.astype(np.float64)


def replay(kind: DetectorKind, timestamps: FloatArray, values: FloatArray) -> Replay:
    """Fit on NAB's probationary rows (as ``POST /fit`` would), then feed every later reading
    in file order, as the stream would deliver it."""
    ts = np.asarray(timestamps, dtype=np.float64)
    vals = np.asarray(values, dtype=np.float64)
    n_fit = probationary_length(ts.size)
    z = np.zeros(ts.size)
    anomaly = np.zeros(ts.size, dtype=bool)
    alert = np.zeros(ts.size, dtype=bool)
    if kind.make_streaming is not None:
        state = kind.make_streaming(ts[:n_fit], vals[:n_fit])
        for i in range(n_fit, ts.size):
            score, alert[i] = state.update(float(ts[i]), float(vals[i]))
            z[i], anomaly[i] = score, score > 1.0
        return Replay(z, anomaly, alert)
    baseline, alerting = kind.make_baseline(), kind.make_alerting()
    baseline.fit(ts[:n_fit], vals[:n_fit])
    k, direction = kind.k, kind.direction
    for i in range(n_fit, ts.size):
        t = float(ts[i])
        zi = baseline.observe(t, float(vals[i]))
        flagged = _exceeds(zi, k, direction)
        z[i], anomaly[i] = zi, flagged
        alert[i] = alerting.alert(t, flagged)
    return Replay(z, anomaly, alert)


def detector_kind(
    name: str,
    *,
    k: float | None = None,
    direction: Direction | None = None,
    quiet_days: float | None = None,
    half_life_days: float | None = None,
    multiscale: MultiscaleParams | None = None,
) -> DetectorKind:
    """Build a registered kind; unset parameters take the kind's defaults (KIND_DEFAULTS)."""
    if name not in KIND_DEFAULTS:
        raise ValueError(f"unknown detector kind {name!r}: one of {', '.join(KIND_DEFAULTS)}")
    d = KIND_DEFAULTS[name]
    k = d.k if k is None else k
    quiet = DAY * (d.quiet_days if quiet_days is None else quiet_days)
    half_life = DAY * (d.half_life_days if half_life_days is None else half_life_days)
    chosen_direction: Direction = direction or d.direction

    def every() -> Alerting:
        return EveryReading()

    def episodes() -> Alerting:
        return Episodes(quiet=quiet)

    def once_a_day() -> Alerting:
        return Episodes(quiet=quiet, extend=False)

    makers: dict[str, tuple[Callable[[], Baseline], Callable[[], Alerting]]] = {
        "static": (StaticBaseline, every),
        "static-episodes": (StaticBaseline, episodes),
        "refit-daily": (RefitBaseline, every),
        "refit-daily-episodes": (RefitBaseline, once_a_day),
        # Measured on NAB: learning every reading (no outlier gate) and re-alerting at most
        # once per quiet period beat the gated, extending variants (docs/detection-quality.md).
        "adaptive": (lambda: AdaptiveBaseline(half_life=half_life), once_a_day),
    }
    if name == "multiscale":
        params = multiscale or MultiscaleParams()

        def fit(ts: FloatArray, values: FloatArray) -> MultiscaleState:
            return MultiscaleState.fit(ts, values, params)

        return DetectorKind(
            name, StaticBaseline, every, k=1.0, direction="both", make_streaming=fit
        )
    make_baseline, make_alerting = makers[name]
    return DetectorKind(name, make_baseline, make_alerting, k=k, direction=chosen_direction)


def multiscale_components(
    params: MultiscaleParams, timestamps: FloatArray, values: FloatArray
) -> tuple[FloatArray, float]:
    """The multiscale kind's three statistics per row (zeros on probationary rows) and the
    series' step: thresholds and quiet periods can then be swept without replaying again."""
    ts = np.asarray(timestamps, dtype=np.float64)
    vals = np.asarray(values, dtype=np.float64)
    n_fit = probationary_length(ts.size)
    state = MultiscaleState.fit(ts[:n_fit], vals[:n_fit], params)
    out = np.zeros((ts.size, 3))
    for i in range(n_fit, ts.size):
        out[i] = state.observe(float(ts[i]), float(vals[i]))
    return out, state.step


def multiscale_alerts(
    components: FloatArray, step: float, timestamps: FloatArray, params: MultiscaleParams
) -> BoolArray:
    """What ``replay`` of the multiscale kind alerts on, from precomputed components."""
    limits = np.array([params.k_point, params.k_shift, params.k_divergence])
    anomalous = np.max(components / limits, axis=1) > 1.0
    return group_alerts(
        np.asarray(timestamps, dtype=np.float64), anomalous, params.quiet_readings * step
    )


@dataclass(frozen=True, slots=True)
class KindDefaults:
    k: float = 3.0
    direction: Direction = "above"
    quiet_days: float = 1.0
    half_life_days: float = 7.0


# The seed's k = 3 "above" for the seed-like kinds; the adaptive kind's values are the
# corpus-wide choice described in docs/detection-quality.md.
KIND_DEFAULTS: dict[str, KindDefaults] = {
    "static": KindDefaults(),
    "static-episodes": KindDefaults(),
    "refit-daily": KindDefaults(),
    "refit-daily-episodes": KindDefaults(),
    "adaptive": KindDefaults(k=4.0, direction="both", quiet_days=0.5, half_life_days=7.0),
    # Its own parameters live in MultiscaleParams (time scales in readings; see
    # docs/detection-quality.md).
    "multiscale": KindDefaults(k=1.0, direction="both"),
}
