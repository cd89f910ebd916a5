"""Offline, event-time replay of pluggable detector kinds over one series (no Redis).

The evaluation's kinds are one table, ``KIND_TABLE``: the service's registered kinds (replayed
through their ``detector.kinds.registry`` plugin, as the stream worker runs them), the
offline-only variants of the seed's rule, and references the service does not ship. A kind
registered in the registry is added with one entry: ``"name": KindSpec(registry_kind("name"))``.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from detector.errors import InvalidInputError
from detector.fitting import fit_training_data
from detector.kinds.base import Direction
from detector.kinds.moments import DecayingMoments, Moments
from detector.kinds.multiscale import MultiscaleParams, MultiscaleState, group_alerts
from detector.kinds.registry import get_kind, stateful_kind
from detector.kinds.static import DIRECTION_CODES, StaticModel, flag
from detector.settings import Settings
from evaluation.nab import probationary_length

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.intp]

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


@dataclass
class RollingBaseline:
    """μ, σ of the ``window`` readings before this one (a sliding window; a reference the
    service does not ship). Seeded with the last ``window`` fitted readings."""

    window: int = 288
    _values: deque[float] = field(default_factory=deque)
    _mean: float = 0.0
    _m2: float = 0.0
    _since_exact: int = 0

    def fit(self, timestamps: FloatArray, values: FloatArray) -> None:
        self._values = deque(float(v) for v in values[-self.window :])
        self._recompute()

    def _recompute(self) -> None:
        # Exact moments of the window now and then, so the sliding updates cannot drift.
        xs = np.fromiter(self._values, dtype=np.float64)
        self._mean = float(np.mean(xs)) if xs.size else 0.0
        self._m2 = float(np.sum((xs - self._mean) ** 2)) if xs.size else 0.0
        self._since_exact = 0

    def observe(self, timestamp: float, value: float) -> float:
        n = len(self._values)
        z = _z(value, self._mean, math.sqrt(max(self._m2, 0.0) / n) if n else math.nan)
        if n == self.window:  # Welford's update, removing the oldest reading
            old = self._values.popleft()
            if n == 1:
                self._mean, self._m2 = 0.0, 0.0
            else:
                delta = old - self._mean
                self._mean -= delta / (n - 1)
                self._m2 -= delta * (old - self._mean)
        self._values.append(value)
        n = len(self._values)
        delta = value - self._mean
        self._mean += delta / n
        self._m2 += delta * (value - self._mean)
        self._since_exact += 1
        if self._since_exact >= self.window:
            self._recompute()
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


@dataclass
class QuietReadings:
    """At most one alert per ``readings`` readings: an anomalous reading alerts unless an
    alert was raised fewer than ``readings`` readings before it (counted in readings)."""

    readings: int = 288
    _since: int = 1 << 62

    def alert(self, timestamp: float, anomalous: bool) -> bool:
        self._since += 1
        if anomalous and self._since >= self.readings:
            self._since = 0
            return True
        return False


class Streaming(Protocol):
    """A self-contained per-series detector: its own rule and alert grouping."""

    def step(self, timestamp: float, value: float) -> tuple[float, bool, bool]:
        """(score, anomalous, alert) of one reading judged before it is learnt."""
        ...


@dataclass
class MultiscaleStreaming:
    """The multiscale state with explicit parameters (the threshold sweeps' path)."""

    state: MultiscaleState

    def step(self, timestamp: float, value: float) -> tuple[float, bool, bool]:
        score, alert = self.state.update(timestamp, value)
        return score, score > 1.0, alert


@dataclass
class RegistryStreaming:
    """A stateful registered kind, folded through its plugin as the stream worker folds it."""

    plugin: Any  # a detector.kinds.base.StatefulKind
    state: Any

    def step(self, timestamp: float, value: float) -> tuple[float, bool, bool]:
        score, anomalous, alert = self.run(np.array([timestamp]), np.array([value]))
        return float(score[0]), bool(anomalous[0]), bool(alert[0])

    def run(
        self, timestamps: FloatArray, values: FloatArray
    ) -> tuple[FloatArray, BoolArray, BoolArray]:
        """A whole series' readings, in order, in one call of the plugin's ``fold``."""
        rows = np.zeros(len(timestamps), dtype=np.intp)
        (self.state,), folded = self.plugin.fold([self.state], rows, timestamps, values)
        return folded.ratio, folded.anomaly, folded.alert


@dataclass
class VersionRule:
    """A stateless registered kind in the stream: the version's rule on every reading, its
    anomalies grouped by the worker's episodes (``EPISODES``) or every one an event."""

    model: StaticModel
    alerting: Alerting

    def step(self, timestamp: float, value: float) -> tuple[float, bool, bool]:
        anomalous = self.model.is_anomaly(value)
        z = _z(value, self.model.mean, self.model.std)
        return z, anomalous, self.alerting.alert(timestamp, anomalous)


@dataclass
class NoModel:
    """A series whose fit was refused (a 422, e.g. a constant training period): no model, so
    its readings raise nothing, as for a user."""

    def step(self, timestamp: float, value: float) -> tuple[float, bool, bool]:
        return 0.0, False, False


def fit_as_service(
    kind: str, settings: Settings, timestamps: FloatArray, values: FloatArray
) -> Streaming:
    """Fit ``kind`` as ``POST /fit`` does (``detector.fitting``, the service's defaults) and
    return what the stream then runs for the series."""
    try:
        _, fitted = fit_training_data(
            np.asarray(timestamps).astype(np.int64), values, settings, kind=kind
        )
    except InvalidInputError:
        return NoModel()
    plugin = stateful_kind(kind)
    if plugin is not None:
        return RegistryStreaming(plugin, plugin.initial_state(fitted.params))
    alerting: Alerting = (
        Episodes(quiet=float(settings.episode_quiet_seconds))
        if settings.episodes
        else EveryReading()
    )
    return VersionRule(fitted.model, alerting)


def stream_rows(timestamps: npt.ArrayLike) -> BoolArray:
    """The rows the stream replay publishes: the first row of each timestamp (a few NAB files
    repeat one); a fit refuses repeated timestamps, and a repeated reading is one reading."""
    keep = np.zeros(np.asarray(timestamps).size, dtype=bool)
    keep[np.unique(np.asarray(timestamps), return_index=True)[1]] = True
    return keep


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
    make_streaming: Callable[[FloatArray, FloatArray], Streaming] | None = None
    # Replay only the rows the stream replay publishes (``stream_rows``), as the service
    # sees them; the offline-only kinds replay every row.
    as_stream: bool = False


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
        keep = stream_rows(ts) if kind.as_stream else np.ones(ts.size, dtype=bool)
        fit_rows = np.flatnonzero(keep[:n_fit])
        state = kind.make_streaming(ts[fit_rows], vals[fit_rows])
        rows = np.flatnonzero(keep[n_fit:]) + n_fit
        if isinstance(state, RegistryStreaming):  # one batch, as the worker folds it
            z[rows], anomaly[rows], alert[rows] = state.run(ts[rows], vals[rows])
            return Replay(z, anomaly, alert)
        for row in rows.tolist():
            z[row], anomaly[row], alert[row] = state.step(float(ts[row]), float(vals[row]))
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


def replay_all(kind: DetectorKind, series: Sequence[tuple[FloatArray, FloatArray]]) -> list[Replay]:
    """``replay`` of many series. The series of a stateful registered kind are folded in one
    call of its plugin's ``fold``, as the worker folds a batch spread over many series (the
    seasonal kind then steps through every series at once)."""
    if kind.make_streaming is None or not kind.as_stream:
        return [replay(kind, ts, vals) for ts, vals in series]
    out: list[Replay | None] = []
    pending: dict[int, tuple[RegistryStreaming, IntArray, FloatArray, FloatArray]] = {}
    for i, (timestamps, values) in enumerate(series):
        ts = np.asarray(timestamps, dtype=np.float64)
        vals = np.asarray(values, dtype=np.float64)
        keep = stream_rows(ts)
        n_fit = probationary_length(ts.size)
        fit_rows = np.flatnonzero(keep[:n_fit])
        state = kind.make_streaming(ts[fit_rows], vals[fit_rows])
        if isinstance(state, RegistryStreaming):
            rows = np.flatnonzero(keep[n_fit:]) + n_fit
            pending[i] = (state, rows, ts, vals)
            out.append(None)
        else:
            out.append(replay(kind, ts, vals))
    if pending:
        members = list(pending)
        plugin = pending[members[0]][0].plugin
        index = np.concatenate(
            [np.full(pending[i][1].size, slot, dtype=np.intp) for slot, i in enumerate(members)]
        )
        ts_all = np.concatenate([pending[i][2][pending[i][1]] for i in members])
        xs_all = np.concatenate([pending[i][3][pending[i][1]] for i in members])
        _, folded = plugin.fold([pending[i][0].state for i in members], index, ts_all, xs_all)
        start = 0
        for i in members:
            _, rows, ts, _ = pending[i]
            end = start + rows.size
            z = np.zeros(ts.size)
            anomaly = np.zeros(ts.size, dtype=bool)
            alert = np.zeros(ts.size, dtype=bool)
            z[rows] = folded.ratio[start:end]
            anomaly[rows] = folded.anomaly[start:end]
            alert[rows] = folded.alert[start:end]
            out[i] = Replay(z, anomaly, alert)
            start = end
    return [r for r in out if r is not None]


@dataclass(frozen=True, slots=True)
class Resolved:
    """A kind's parameters once its defaults are filled in (seconds, not days)."""

    k: float
    direction: Direction
    quiet: float
    half_life: float


@dataclass(frozen=True, slots=True)
class KindDefaults:
    k: float = 3.0
    direction: Direction = "above"
    quiet_days: float = 1.0
    half_life_days: float = 7.0


@dataclass(frozen=True, slots=True)
class KindSpec:
    """One row of the evaluation's kind table: how to build the kind, its defaults, which of
    the overridable parameters (``k``, ``direction``, ``quiet_days``, ``half_life_days``) it
    takes, and whether it is a reference the service does not ship."""

    build: Callable[[str, Resolved], DetectorKind]
    defaults: KindDefaults = KindDefaults()
    takes: tuple[str, ...] = ()
    reference: bool = False


def rule_kind(
    baseline: Callable[[Resolved], Baseline], alerting: Callable[[Resolved], Alerting]
) -> Callable[[str, Resolved], DetectorKind]:
    """A baseline judged by the kσ rule, its anomalies turned into alerts by ``alerting``."""

    def build(name: str, r: Resolved) -> DetectorKind:
        return DetectorKind(
            name, lambda: baseline(r), lambda: alerting(r), k=r.k, direction=r.direction
        )

    return build


def registry_kind(registered: str) -> Callable[[str, Resolved], DetectorKind]:
    """A kind of ``detector.kinds.registry``, replayed as the service runs it: fitted as
    ``POST /fit`` fits it (the service's settings), then folded through its plugin (a
    stateful kind) or judged by the version's rule with the worker's episodes."""
    get_kind(registered)  # an unknown name fails here, when the table is built

    def build(name: str, r: Resolved) -> DetectorKind:
        settings = Settings()

        def fit(ts: FloatArray, values: FloatArray) -> Streaming:
            return fit_as_service(registered, settings, ts, values)

        return DetectorKind(
            name,
            StaticBaseline,
            EveryReading,
            k=r.k,
            direction=r.direction,
            make_streaming=fit,
            as_stream=True,
        )

    return build


def _every(r: Resolved) -> Alerting:
    return EveryReading()


def _episodes(r: Resolved) -> Alerting:
    return Episodes(quiet=r.quiet)


def _once_per_quiet(r: Resolved) -> Alerting:
    return Episodes(quiet=r.quiet, extend=False)


# The reference's fixed setting (not tuned on any corpus): a day of 5-minute readings.
ROLLING_READINGS = 288

# The evaluation's kinds. The seed's k = 3 "above" for the seed-like kinds; the adaptive
# kind's values are the corpus-wide choice described in docs/detection-quality.md.
KIND_TABLE: dict[str, KindSpec] = {
    "static": KindSpec(rule_kind(lambda r: StaticBaseline(), _every), takes=("k", "direction")),
    "static-episodes": KindSpec(
        rule_kind(lambda r: StaticBaseline(), _episodes),
        takes=("k", "direction", "quiet_days"),
    ),
    "refit-daily": KindSpec(rule_kind(lambda r: RefitBaseline(), _every), takes=("k", "direction")),
    "refit-daily-episodes": KindSpec(
        rule_kind(lambda r: RefitBaseline(), _once_per_quiet),
        takes=("k", "direction", "quiet_days"),
    ),
    # Measured on NAB: learning every reading (no outlier gate) and re-alerting at most
    # once per quiet period beat the gated, extending variants (docs/detection-quality.md).
    "adaptive": KindSpec(
        rule_kind(lambda r: AdaptiveBaseline(half_life=r.half_life), _once_per_quiet),
        KindDefaults(k=4.0, direction="both", quiet_days=0.5, half_life_days=7.0),
        takes=("k", "direction", "quiet_days", "half_life_days"),
    ),
    # Its own parameters live in MultiscaleParams (time scales in readings; see
    # docs/detection-quality.md).
    "multiscale": KindSpec(registry_kind("multiscale"), KindDefaults(k=1.0, direction="both")),
    # Its own parameters live in SeasonalParams (time scales bounded to the cadence).
    "seasonal": KindSpec(registry_kind("seasonal"), KindDefaults(k=1.0, direction="both")),
    # Reference: |z| > 4 against the previous 288 readings, at most one alert per 288.
    "rolling-z": KindSpec(
        rule_kind(
            lambda r: RollingBaseline(window=ROLLING_READINGS),
            lambda r: QuietReadings(readings=ROLLING_READINGS),
        ),
        KindDefaults(k=4.0, direction="both"),
        takes=("k", "direction"),
        reference=True,
    ),
}
KIND_DEFAULTS: dict[str, KindDefaults] = {n: spec.defaults for n, spec in KIND_TABLE.items()}


def detector_kind(
    name: str,
    *,
    k: float | None = None,
    direction: Direction | None = None,
    quiet_days: float | None = None,
    half_life_days: float | None = None,
    multiscale: MultiscaleParams | None = None,
) -> DetectorKind:
    """Build a kind of ``KIND_TABLE``; unset parameters take the kind's defaults.

    ``multiscale`` replays the multiscale state with explicit parameters (the sweeps' path)
    instead of the registered kind's fit.
    """
    if name not in KIND_TABLE:
        raise ValueError(f"unknown detector kind {name!r}: one of {', '.join(KIND_TABLE)}")
    if multiscale is not None:
        if name != "multiscale":
            raise ValueError("explicit multiscale parameters need the multiscale kind")
        params = multiscale

        def fit(ts: FloatArray, values: FloatArray) -> Streaming:
            return MultiscaleStreaming(MultiscaleState.fit(ts, values, params))

        return DetectorKind(
            name, StaticBaseline, EveryReading, k=1.0, direction="both", make_streaming=fit
        )
    spec = KIND_TABLE[name]
    d = spec.defaults
    resolved = Resolved(
        k=d.k if k is None else k,
        direction=direction or d.direction,
        quiet=DAY * (d.quiet_days if quiet_days is None else quiet_days),
        half_life=DAY * (d.half_life_days if half_life_days is None else half_life_days),
    )
    return spec.build(name, resolved)


def stream_kind(settings: Settings | None = None) -> DetectorKind:
    """The kind the stream runs for a fit that names no kind (``settings.default_kind``),
    with the service's alert grouping: what a user gets by default."""
    settings = settings or Settings()
    chosen = settings

    def fit(ts: FloatArray, values: FloatArray) -> Streaming:
        return fit_as_service(chosen.default_kind, chosen, ts, values)

    return DetectorKind(
        chosen.default_kind, StaticBaseline, EveryReading, make_streaming=fit, as_stream=True
    )


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
