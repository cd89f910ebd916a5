"""Multiscale streaming detector: point, short-window shift and histogram-change tests."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from detector.kinds.base import MAX_SCORE, FitOptions, Fitted, Folded, Verdicts
from detector.kinds.moments import Moments, fit_readings
from detector.kinds.static import StaticModel, fit_static
from detector.kinds.training import FloatArray, TrainingData

# Laplace-style pseudo-count spread over the slow histogram: an unseen bin is rare, not
# impossible, so the divergence stays finite.
PSEUDO_COUNT = 0.5
# Fast-histogram shares below this are rounding leftovers of decay, not readings.
MIN_SHARE = 1e-12
# The tests a reading can fail, in the order of MultiscaleState.observe's statistics.
TESTS = ("point", "shift", "divergence")


@dataclass(frozen=True, slots=True)
class MultiscaleParams:
    """Corpus-wide settings; time scales are counted in readings of the series' own cadence."""

    slow_readings: float = 2016.0  # half-life of the long baseline (a week at 5 min)
    fast_readings: float = 6.0  # half-life of the short window (30 min at 5 min)
    bins: int = 10  # equal-width bins over the fit's range, plus one below and one above
    k_point: float = 8.0  # |x − μ_slow| / σ_slow
    k_shift: float = 5.0  # |μ_fast − μ_slow| / (σ_slow / √w_fast)
    k_divergence: float = 60.0  # 2·w_fast·KL(fast histogram ‖ slow histogram)
    quiet_readings: float = 144.0  # no new alert for this long after one (12 h at 5 min)

    def __post_init__(self) -> None:
        if not (0 < self.fast_readings < self.slow_readings < math.inf):
            raise ValueError("need 0 < fast_readings < slow_readings < inf")
        if self.bins < 1:
            raise ValueError("bins must be at least 1")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MultiscaleParams:
        return cls(**{**data, "bins": int(data["bins"])})


@dataclass(slots=True)
class MultiscaleState:
    """One series' detector state: about 2·bins + 16 floats (40 at 10 bins), JSON-storable.

    Slow and fast decaying moments and histograms are anchored at ``time``; a reading at t
    weighs 2^(−(time − t)/half-life). Those parts merge exactly (decay to the later anchor,
    then Chan's merge / add the histograms), so they do not depend on arrival order or on
    which worker folded which batch. The scores are not order-free: each reading is judged
    against the state as it stood when the reading arrived, and ``last_alert`` groups alerts
    sequentially, so a series' readings should reach one state at a time (an atomic update).
    """

    params: MultiscaleParams
    step: float  # seconds per reading, the fit's median interval
    low: float  # lower edge of the first inner bin
    width: float  # inner bin width
    time: float = -math.inf
    slow: Moments = field(default_factory=Moments)
    fast: Moments = field(default_factory=Moments)
    slow_hist: list[float] = field(default_factory=list)
    fast_hist: list[float] = field(default_factory=list)
    last_alert: float = -math.inf

    @classmethod
    def fit(
        cls, timestamps: Any, values: Any, params: MultiscaleParams | None = None
    ) -> MultiscaleState:
        """The state after the fit's readings; bins and cadence are fixed here for good."""
        params = params or MultiscaleParams()
        ts, xs, step = fit_readings(timestamps, values)
        low, high = float(np.min(xs)), float(np.max(xs))
        # A flat fit has no range: unit-wide bins still tell "same value" from "moved".
        width = (high - low) / params.bins if high > low else 1.0 / params.bins
        state = cls(params, step, low, width)
        state.slow_hist = [0.0] * (params.bins + 2)
        state.fast_hist = [0.0] * (params.bins + 2)
        anchor = float(np.max(ts))
        bins = np.array([state._bin(float(x)) for x in xs])
        for name, half_life in (("slow", state.slow_half_life), ("fast", state.fast_half_life)):
            weights = np.exp2(-(anchor - ts) / half_life)
            hist = np.bincount(bins, weights=weights, minlength=params.bins + 2)
            setattr(state, name, Moments.of(xs, weights))
            setattr(state, f"{name}_hist", [float(h) for h in hist])
        state.time = anchor
        return state

    @property
    def slow_half_life(self) -> float:
        return self.params.slow_readings * self.step

    @property
    def fast_half_life(self) -> float:
        return self.params.fast_readings * self.step

    def _bin(self, value: float) -> int:
        b = math.floor((value - self.low) / self.width) + 1
        return 0 if b < 1 else min(b, self.params.bins + 1)

    def _decay_to(self, time: float) -> None:
        if time <= self.time:
            return
        if self.time > -math.inf:
            a = math.exp2(-(time - self.time) / self.slow_half_life)
            b = math.exp2(-(time - self.time) / self.fast_half_life)
            self.slow, self.fast = self.slow.scaled(a), self.fast.scaled(b)
            self.slow_hist = [h * a for h in self.slow_hist]
            self.fast_hist = [h * b for h in self.fast_hist]
        self.time = time

    def observe(self, timestamp: float, value: float) -> tuple[float, float, float]:
        """Fold one reading in; return its (point z, shift z, divergence), all ≥ 0.

        The point and divergence tests compare with the slow state *before* the reading (a
        reading must not explain itself away); the fast window includes it.
        """
        t, x = float(timestamp), float(value)
        if not (math.isfinite(t) and math.isfinite(x)):
            raise ValueError("timestamp and value must be finite")
        self._decay_to(t)
        # A late reading arrives already decayed, exactly as a merge would weigh it.
        late = t - self.time
        w_slow = math.exp2(late / self.slow_half_life) if late < 0 else 1.0
        w_fast = math.exp2(late / self.fast_half_life) if late < 0 else 1.0
        slow = self.slow
        k = self._bin(x)
        self.fast = self.fast.merge(Moments(w_fast, x, 0.0)) if w_fast > 0 else self.fast
        self.fast_hist[k] += w_fast
        point = shift = divergence = 0.0
        if slow.weight > 0.0:  # else nothing is remembered: learn, do not judge
            std = slow.std
            point = _ratio(abs(x - slow.mean), std)
            fast = self.fast
            shift = _ratio(abs(fast.mean - slow.mean) * math.sqrt(fast.weight), std)
            divergence = self._divergence(slow.weight)
        if w_slow > 0:
            self.slow = slow.merge(Moments(w_slow, x, 0.0))
            self.slow_hist[k] += w_slow
        return point, shift, divergence

    def _divergence(self, slow_total: float) -> float:
        """G statistic 2·n·KL(fast ‖ slow): ~χ² with bins + 1 degrees of freedom if the short
        window were drawn from the long-run distribution (n = the fast window's weight)."""
        n = self.fast.weight
        if n <= 0.0:
            return 0.0
        prior = PSEUDO_COUNT / len(self.slow_hist)
        denominator = slow_total + PSEUDO_COUNT
        kl = 0.0
        for f, s in zip(self.fast_hist, self.slow_hist, strict=True):
            p = f / n
            if p > MIN_SHARE:
                kl += p * math.log(p * denominator / (s + prior))
        return min(2.0 * n * max(kl, 0.0), MAX_SCORE)

    def score(self, components: tuple[float, float, float]) -> float:
        """The largest test statistic relative to its threshold: > 1 means anomalous."""
        p = self.params
        point, shift, divergence = components
        return min(
            max(point / p.k_point, shift / p.k_shift, divergence / p.k_divergence), MAX_SCORE
        )

    def update(self, timestamp: float, value: float) -> tuple[float, bool]:
        """(score, alert): alert is True for an anomalous reading more than the quiet period
        after the previous alert (one alert per excursion, from its onset)."""
        score, alert, _ = self.judge(timestamp, value)
        return score, alert

    def judge(self, timestamp: float, value: float) -> tuple[float, bool, str]:
        """``update`` that also names the test that fired ("" when none did)."""
        components = self.observe(timestamp, value)
        score = self.score(components)
        test = ""
        if score > 1.0:
            p = self.params
            ratios = (
                components[0] / p.k_point,
                components[1] / p.k_shift,
                components[2] / p.k_divergence,
            )
            test = TESTS[ratios.index(max(ratios))]
        alert = score > 1.0 and timestamp - self.last_alert > self.quiet_seconds
        if alert:
            self.last_alert = float(timestamp)
        return score, alert, test

    @property
    def quiet_seconds(self) -> float:
        return self.params.quiet_readings * self.step

    def merge(self, other: MultiscaleState) -> MultiscaleState:
        """The state holding both states' readings (commutative; needs the same fit)."""
        if (other.params, other.step, other.low, other.width) != (
            self.params,
            self.step,
            self.low,
            self.width,
        ):
            raise ValueError("cannot merge states of different fits")
        a, b = self.copy(), other.copy()
        anchor = max(a.time, b.time)
        a._decay_to(anchor)
        b._decay_to(anchor)
        a.slow, a.fast = a.slow.merge(b.slow), a.fast.merge(b.fast)
        a.slow_hist = [x + y for x, y in zip(a.slow_hist, b.slow_hist, strict=True)]
        a.fast_hist = [x + y for x, y in zip(a.fast_hist, b.fast_hist, strict=True)]
        a.last_alert = max(a.last_alert, b.last_alert)
        return a

    def copy(self) -> MultiscaleState:
        return MultiscaleState.from_dict(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (±inf for "never" are written as None)."""
        return {
            "params": asdict(self.params),
            "step": self.step,
            "low": self.low,
            "width": self.width,
            "time": _finite_or_none(self.time),
            "slow": self.slow.to_dict(),
            "fast": self.fast.to_dict(),
            "slow_hist": list(self.slow_hist),
            "fast_hist": list(self.fast_hist),
            "last_alert": _finite_or_none(self.last_alert),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MultiscaleState:
        return cls(
            params=MultiscaleParams.from_dict(data["params"]),
            step=float(data["step"]),
            low=float(data["low"]),
            width=float(data["width"]),
            time=-math.inf if data["time"] is None else float(data["time"]),
            slow=Moments(**data["slow"]),
            fast=Moments(**data["fast"]),
            slow_hist=[float(h) for h in data["slow_hist"]],
            fast_hist=[float(h) for h in data["fast_hist"]],
            last_alert=-math.inf if data["last_alert"] is None else float(data["last_alert"]),
        )


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _ratio(deviation: float, std: float) -> float:
    if std > 0.0 and math.isfinite(std):
        return min(deviation / std, MAX_SCORE)
    # A flat baseline: any change is infinitely surprising, no change is not.
    return 0.0 if deviation == 0.0 else MAX_SCORE


def group_alerts(
    timestamps: FloatArray, anomalous: npt.NDArray[np.bool_], quiet: float
) -> npt.NDArray[np.bool_]:
    """``MultiscaleState.update``'s alert rule over a whole replay: an anomalous reading
    alerts when more than ``quiet`` seconds have passed since the previous alert."""
    out = np.zeros(anomalous.shape, dtype=bool)
    last = -math.inf
    for i in np.flatnonzero(anomalous):
        t = float(timestamps[i])
        if t - last > quiet:
            out[i], last = True, t
    return out


@dataclass(frozen=True, slots=True)
class MultiscaleModel(StaticModel):
    """A multiscale version's stateless rule: the training data's μ, σ and the fit's k and
    direction, which ``POST /predict``, the batch endpoint, ``/plot`` and readings pinned to
    this version use, since a single call has no stream context. Its streaming state starts
    from the fitted ``MultiscaleState`` kept in the version's params."""

    kind: ClassVar[str] = "multiscale"


class MultiscaleKind:
    """Point, short-window shift and histogram-change tests over decaying baselines, with its
    own alert grouping (one alert per excursion, ``quiet_readings`` apart)."""

    name: ClassVar[str] = "multiscale"
    stateful: ClassVar[bool] = True

    def fit(self, data: TrainingData, options: FitOptions) -> Fitted:
        rule = fit_static(data, sigma=options.sigma, direction=options.direction)
        state = MultiscaleState.fit(data.timestamps, data.values)
        model = MultiscaleModel(rule.mean, rule.std, rule.sigma, rule.direction)
        return Fitted(model, {"state": state.to_dict()})

    def score(self, model: StaticModel, values: Any) -> Verdicts:
        return model.score(values)

    def initial_state(self, params: dict[str, Any]) -> MultiscaleState:
        return MultiscaleState.from_dict(params["state"])

    def fold(
        self,
        states: Sequence[MultiscaleState],
        rows: npt.NDArray[np.intp],
        timestamps: FloatArray,
        values: FloatArray,
    ) -> tuple[list[MultiscaleState], Folded]:
        """Each reading judged against its series' baseline as it stood before it, then
        learned (one reading at a time: this kind's state is not vectorised)."""
        new = [s.copy() for s in states]
        n = len(rows)
        cols = {k: np.zeros(n) for k in ("expected", "std", "lower", "upper", "score", "ratio")}
        anomaly, alert = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
        test = np.zeros(n, dtype=np.intp)
        for i in range(n):
            state = new[int(rows[i])]
            slow = state.slow
            value = float(values[i])
            ratio, alert[i], fired = state.judge(float(timestamps[i]), value)
            mean, std = slow.mean, slow.std
            band = state.params.k_point * std
            cols["expected"][i], cols["std"][i] = mean, std
            cols["lower"][i], cols["upper"][i] = mean - band, mean + band
            cols["score"][i], cols["ratio"][i] = signed_z(value, mean, std), ratio
            anomaly[i] = ratio > 1.0
            test[i] = TESTS.index(fired) + 1 if fired else 0
        return new, Folded(anomaly, alert, **cols, test=test)

    def baseline(
        self, params: dict[str, Any], timestamps: FloatArray
    ) -> tuple[FloatArray, FloatArray, FloatArray]:
        state = self.initial_state(params)
        shape = np.shape(timestamps)
        mean, band = state.slow.mean, state.params.k_point * state.slow.std
        return np.full(shape, mean), np.full(shape, mean - band), np.full(shape, mean + band)

    def encode_state(self, state: MultiscaleState) -> dict[str, Any]:
        return state.to_dict()

    def decode_state(self, data: dict[str, Any]) -> MultiscaleState:
        return MultiscaleState.from_dict(data)

    def prepare(self) -> None:
        """Nothing to load: the fold is plain Python."""

    def merge(self, a: MultiscaleState, b: MultiscaleState) -> MultiscaleState:
        return a.merge(b)


def signed_z(value: float, mean: float, std: float) -> float:
    """The contract's signed z against a baseline, finite (±MAX_SCORE on a flat one): the
    per-reading form of ``detector.kinds.base.signed_z``, which a fitted σ never needs."""
    if std > 0.0 and math.isfinite(std):
        return max(-MAX_SCORE, min(MAX_SCORE, (value - mean) / std))
    return 0.0 if value == mean else math.copysign(MAX_SCORE, value - mean)
