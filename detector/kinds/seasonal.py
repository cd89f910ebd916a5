"""The ``seasonal`` kind: a daily and weekly profile learned online, with the multiscale tests
run on what the profile does not explain, and time scales that fit the series' cadence.

**Model.** A reading ``x`` at time ``t`` is ``level + daily[hour(t)] + weekly[weekday(t)] +
noise`` (hours and weekdays in UTC). The level is a slow exponentially decaying mean of the
deseasonalised values ``y = x − daily − weekly``; each profile slot is an exponentially
weighted mean of the residuals that fell into it (re-centred to sum to zero, so the level stays
the level). Each profile is switched on at fit only when the training data covers one whole
period of it (a day, a week) and the profile explains at least ``season_strength`` of the
variance it is fitted on; a series without a season keeps both off and is scored exactly as a
non-seasonal series would be.

**Tests**, on ``y`` against the slow baseline as it stood before the reading: the point z
``|y − μ|/σ``, the shift z of a short window ``|μ_fast − μ|·√w_fast/σ`` (a level change no
single reading shows), and the histogram change ``2·w_fast·KL(fast ‖ slow)`` over bins fixed at
fit (changed shape or variance, a flat line inside the usual range). A reading is anomalous when
a statistic passes its threshold; it alerts (opens an episode) when the previous alert is older
than the quiet period. With ``exclude_anomalies`` a reading that fails the point test is
learned clipped to the band (μ ± k_point·σ), by the short window and the baseline alike: a
spike is the point test's alone, it does not widen the baseline, bend the profile or keep the
window's tests firing after it, while a lasting level change is still learned, a band's width
at a time.

**Time scales** (``TimeScale``): a wall-clock duration bounded to a range of readings of the
series' cadence (the fit's median interval). The quiet period is 12 hours, but at least 12 and
at most 144 readings: 12 h for a 5-minute or an hourly series, 144 s for a 1 Hz sensor. A count
alone gives an hourly series one alert per 6 days; a duration alone gives a 1 Hz sensor one
alert per 43,200 readings.

**State** is one row of ``WIDTH`` float64 (``STATE_BYTES``, 616 bytes) per series, with every
threshold and time scale resolved into it at fit. Rows stack into a bank, and ``fold`` runs the
rule over a batch's readings, whatever their mix of series, in one compiled loop (numba, about
a microsecond a reading); the same function replays one series or a whole corpus offline.

**Feedback.** A series with feedback keeps its adjustment after the row
(``detector.feedback.Adjustment.vector``: ``ADJUSTED_WIDTH`` floats, 1,264 bytes in all), and
the fold multiplies each test's threshold, the version's own, by the multiple in force at the
reading's time and UTC hour (``with_adjustment``). Rows without it are folded as they are.
"""

from __future__ import annotations

import base64
import functools
import itertools
import math
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Final

import numpy as np
import numpy.typing as npt
import orjson

from detector.feedback import HOURS as FEEDBACK_HOURS
from detector.feedback import (
    V_CAP,
    V_CEILING,
    V_HALF_LIFE,
    V_HOURS,
    V_LOG,
    V_TIME,
    VECTOR_LENGTH,
    Adjustment,
)
from detector.kinds.base import MAX_SCORE, FitOptions, Fitted, Folded, Verdicts
from detector.kinds.moments import Moments, fit_readings
from detector.kinds.static import StaticModel, fit_static
from detector.kinds.training import FloatArray, TrainingData

IntArray = npt.NDArray[np.intp]

DAY: Final = 86_400.0
HOUR: Final = 3_600.0
WEEK: Final = 7 * DAY
HOURS: Final = 24
WEEKDAYS: Final = 7
BINS: Final = 10  # equal-width bins over the fit's residual range, plus one below, one above
# Laplace-style pseudo-count spread over the slow histogram: an unseen bin is rare, not
# impossible, so the divergence stays finite.
PSEUDO_COUNT: Final = 0.5
# Fast-histogram shares below this are rounding leftovers of decay, not readings.
MIN_SHARE: Final = 1e-12

_SCALARS: Final = (
    "step",
    "low",
    "width",
    "time",
    "slow_w",
    "slow_mean",
    "slow_m2",
    "fast_w",
    "fast_mean",
    "fast_m2",
    "last_alert",
    "slow_hl",
    "fast_hl",
    "quiet",
    "k_point",
    "k_shift",
    "k_divergence",
    "exclude",
    "daily_on",
    "weekly_on",
    "daily_rate",
    "weekly_rate",
)
_COL: Final = {name: i for i, name in enumerate(_SCALARS)}
(
    STEP,
    LOW,
    BIN_WIDTH,
    TIME,
    SLOW_W,
    SLOW_MEAN,
    SLOW_M2,
    FAST_W,
    FAST_MEAN,
    FAST_M2,
    LAST_ALERT,
    SLOW_HL,
    FAST_HL,
    QUIET,
    K_POINT,
    K_SHIFT,
    K_DIVERGENCE,
    EXCLUDE,
    DAILY_ON,
    WEEKLY_ON,
    DAILY_RATE,
    WEEKLY_RATE,
) = range(len(_SCALARS))
DAILY: Final = len(_SCALARS)
WEEKLY: Final = DAILY + HOURS
SLOW_HIST: Final = WEEKLY + WEEKDAYS
FAST_HIST: Final = SLOW_HIST + BINS + 2
WIDTH: Final = FAST_HIST + BINS + 2
STATE_BYTES: Final = WIDTH * 8
# A row with a feedback adjustment: the row, then ``Adjustment.vector()`` (its offsets: V_*).
ADJUSTED_WIDTH: Final = WIDTH + VECTOR_LENGTH
ADJUSTED_BYTES: Final = ADJUSTED_WIDTH * 8
A_TIME: Final = WIDTH + V_TIME
A_HALF_LIFE: Final = WIDTH + V_HALF_LIFE
A_CEILING: Final = WIDTH + V_CEILING
A_LOG: Final = WIDTH + V_LOG
A_CAP: Final = WIDTH + V_CAP
A_HOURS: Final = WIDTH + V_HOURS


@dataclass(frozen=True, slots=True)
class TimeScale:
    """A duration that fits the series: ``seconds``, bounded to [``min_readings``,
    ``max_readings``] readings of its cadence."""

    seconds: float
    min_readings: float
    max_readings: float

    def __post_init__(self) -> None:
        if not (0 < self.min_readings <= self.max_readings < math.inf and self.seconds > 0):
            raise ValueError("need seconds > 0 and 0 < min_readings <= max_readings < inf")

    def resolve(self, step: float) -> float:
        """Seconds, for a series whose readings are ``step`` seconds apart."""
        return min(max(self.seconds, self.min_readings * step), self.max_readings * step)


@dataclass(frozen=True, slots=True)
class SeasonalParams:
    """Corpus-wide settings; each version resolves them into its state at fit."""

    slow: TimeScale = field(default_factory=lambda: TimeScale(7 * DAY, 100.0, 2016.0))
    fast: TimeScale = field(default_factory=lambda: TimeScale(1800.0, 3.0, 6.0))
    quiet: TimeScale = field(default_factory=lambda: TimeScale(12 * HOUR, 12.0, 144.0))
    k_point: float = 8.0
    k_shift: float = 5.0
    k_divergence: float = 60.0
    season: bool = True  # detect daily and weekly profiles at fit (False: never)
    season_strength: float = 0.2  # share of variance a profile must explain to be used
    season_half_life: float = 14.0  # memory of a profile slot, in periods of that profile
    exclude_anomalies: bool = True

    def __post_init__(self) -> None:
        if min(self.k_point, self.k_shift, self.k_divergence) <= 0:
            raise ValueError("thresholds must be positive")
        if self.slow.min_readings <= self.fast.max_readings:
            raise ValueError("the slow baseline must be longer than the fast window")

    def to_dict(self) -> dict[str, Any]:
        """A fresh dict each call, parsed from the JSON made once (``asdict`` took a quarter
        of a small series' fit, and a bulk fit asks once a series)."""
        result: dict[str, Any] = orjson.loads(_params_json(self))
        return result

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SeasonalParams:
        fields: dict[str, Any] = dict(data)
        for name in ("slow", "fast", "quiet"):
            if name in fields:
                fields[name] = TimeScale(**fields[name])
        return cls(**fields)


@functools.lru_cache(maxsize=64)
def _params_json(params: SeasonalParams) -> bytes:
    return orjson.dumps(asdict(params))


def hour_of_day(t: Any) -> Any:
    """The UTC hour of Unix seconds (whole and non-negative, as every reading's are: integer
    division is the floor, and several times faster than a float floor_divide)."""
    return ((np.asarray(t).astype(np.int64) // HOUR) % HOURS).astype(np.intp)


def day_of_week(t: Any) -> Any:
    """0 is Monday (1970-01-01, day 0, was a Thursday)."""
    return ((np.asarray(t).astype(np.int64) // DAY + 3) % WEEKDAYS).astype(np.intp)


def _profile(slots: IntArray, residuals: FloatArray, size: int) -> tuple[FloatArray, float]:
    """Per-slot means of the residuals, centred over the slots seen, and the share of the
    residuals' variance they explain."""
    counts = np.bincount(slots, minlength=size).astype(np.float64)
    sums = np.bincount(slots, weights=residuals, minlength=size)
    seen = counts > 0
    profile = np.zeros(size)
    profile[seen] = sums[seen] / counts[seen]
    profile[seen] -= np.sum(profile[seen] * counts[seen]) / np.sum(counts[seen])
    total = float(np.var(residuals))
    explained = float(np.var(profile[slots])) / total if total > 0 else 0.0
    return profile, explained


def _decay_weights(ts: FloatArray, anchor: float, half_life: float) -> FloatArray:
    return np.exp2(-(anchor - ts) / half_life)


def fit_state(timestamps: Any, values: Any, params: SeasonalParams | None = None) -> FloatArray:
    """The state row after the fit's readings, in closed form (no per-reading loop)."""
    params = params or SeasonalParams()
    ts, xs, step = fit_readings(timestamps, values)
    order = np.argsort(ts, kind="stable")
    ts, xs = ts[order], xs[order]
    span = float(ts[-1] - ts[0])
    row = np.zeros(WIDTH)
    row[STEP] = step
    row[SLOW_HL] = params.slow.resolve(step)
    row[FAST_HL] = params.fast.resolve(step)
    row[QUIET] = params.quiet.resolve(step)
    row[K_POINT], row[K_SHIFT], row[K_DIVERGENCE] = (
        params.k_point,
        params.k_shift,
        params.k_divergence,
    )
    row[EXCLUDE] = float(params.exclude_anomalies)
    # The profiles, fitted on the residuals around the fit's slow level.
    level = xs - np.mean(xs)
    seasonal = np.zeros_like(xs)
    if params.season and span >= DAY:
        hours = hour_of_day(ts)
        daily, share = _profile(hours, level, HOURS)
        if share >= params.season_strength:
            row[DAILY_ON] = 1.0
            row[DAILY : DAILY + HOURS] = daily
            seasonal += daily[hours]
    if params.season and span >= WEEK:
        days = day_of_week(ts)
        weekly, share = _profile(days, level - seasonal, WEEKDAYS)
        if share >= params.season_strength:
            row[WEEKLY_ON] = 1.0
            row[WEEKLY : WEEKLY + WEEKDAYS] = weekly
            seasonal += weekly[days]
    # Per-reading learning rates: a slot's memory is season_half_life periods' worth of the
    # readings that fall into it.
    per_hour = max(1.0, HOUR / step)
    per_day = max(1.0, DAY / step)
    row[DAILY_RATE] = 1.0 - 2.0 ** (-1.0 / (params.season_half_life * per_hour))
    row[WEEKLY_RATE] = 1.0 - 2.0 ** (-1.0 / (params.season_half_life * per_day))
    ys = xs - seasonal
    low, high = float(np.min(ys)), float(np.max(ys))
    # A flat fit has no range: unit-wide bins still tell "same value" from "moved".
    width = (high - low) / BINS if high > low else 1.0 / BINS
    row[LOW], row[BIN_WIDTH] = low, width
    anchor = float(ts[-1])
    bins = _bins(ys, low, width)
    for w_col, hist, hl in ((SLOW_W, SLOW_HIST, row[SLOW_HL]), (FAST_W, FAST_HIST, row[FAST_HL])):
        weights = _decay_weights(ts, anchor, hl)
        moments = Moments.of(ys, weights)
        row[w_col : w_col + 3] = moments.weight, moments.mean, moments.m2
        row[hist : hist + BINS + 2] = np.bincount(bins, weights=weights, minlength=BINS + 2)
    row[TIME] = anchor
    row[LAST_ALERT] = -math.inf
    return row


def _bins(y: Any, low: Any, width: Any) -> Any:
    with np.errstate(invalid="ignore", over="ignore"):
        b = np.floor((y - low) / width) + 1
    return np.clip(np.nan_to_num(b, nan=0.0, posinf=BINS + 1, neginf=0.0), 0, BINS + 1).astype(
        np.intp
    )


def fold(
    bank: FloatArray,
    rows: IntArray,
    timestamps: FloatArray,
    values: FloatArray,
    statistics: FloatArray | None = None,
) -> Folded:
    """Fold readings into the bank's rows, in place; ``rows[i]`` is reading i's series row.

    Each series' readings must be given in the order they are to be folded (event time);
    readings of different series may interleave in any way, as each updates its own row. The
    loop is compiled (numba): about a microsecond a reading, for one series or many.
    ``statistics`` (n × 3, optional) receives each reading's point, shift and divergence
    statistics (the evaluation sweeps thresholds over them). The bank's rows are either all
    ``WIDTH`` wide or all ``ADJUSTED_WIDTH`` (with a feedback adjustment each, the identity's
    for a series without one).
    """
    if bank.shape[1] not in (WIDTH, ADJUSTED_WIDTH):
        raise ValueError(f"a seasonal bank has {WIDTH} or {ADJUSTED_WIDTH} columns")
    n = len(rows)
    anomaly = np.zeros(n, dtype=np.bool_)
    alert = np.zeros(n, dtype=np.bool_)
    test = np.zeros(n, dtype=np.intp)
    out = np.zeros((7, n))
    stats = np.zeros((n, 3)) if statistics is None else statistics
    if n:
        _compiled()(
            bank,
            np.ascontiguousarray(rows, dtype=np.intp),
            np.ascontiguousarray(timestamps, dtype=np.float64),
            np.ascontiguousarray(values, dtype=np.float64),
            anomaly,
            alert,
            test,
            out,
            stats,
        )
    expected, std, lower, upper, score, ratio, level = out
    return Folded(anomaly, alert, expected, std, lower, upper, score, ratio, test, level)


_COMPILING = threading.Lock()


def _compiled() -> Any:
    """``_fold_loop`` compiled by numba on first use (numba's disk cache keeps it for the next
    process): a process that never folds a seasonal series (the API, a worker whose series
    are all static) never loads the compiler. The first fold in a process waits for it."""
    with _COMPILING:
        return _compile()


@functools.cache
def _compile() -> Any:
    import numba

    return numba.njit(cache=True, nogil=True)(_fold_loop)


def _fold_loop(
    bank: Any,
    rows: Any,
    ts: Any,
    xs: Any,
    anomaly: Any,
    alert: Any,
    test: Any,
    out: Any,
    stats: Any,
) -> None:
    """The kind's rule, one reading at a time (see the module's docstring)."""
    prior = PSEUDO_COUNT / (BINS + 2)
    adjusted = bank.shape[1] > WIDTH
    k = np.empty(3)
    for i in range(rows.shape[0]):
        s = bank[rows[i]]
        t, x = ts[i], xs[i]
        dt = t - s[TIME]
        ahead = dt if dt > 0.0 else 0.0  # a never-fed state (-inf anchor): dt is inf
        a = 2.0 ** (-ahead / s[SLOW_HL])
        b = 2.0 ** (-ahead / s[FAST_HL])
        s[SLOW_W] *= a
        s[SLOW_M2] *= a
        s[FAST_W] *= b
        s[FAST_M2] *= b
        for j in range(BINS + 2):
            s[SLOW_HIST + j] *= a
            s[FAST_HIST + j] *= b
        s[TIME] = max(s[TIME], t)
        # A late reading arrives already decayed, exactly as a merge would weigh it.
        late = min(dt, 0.0)
        w_slow = 2.0 ** (late / s[SLOW_HL])
        w_fast = 2.0 ** (late / s[FAST_HL])
        hour = int(np.floor(t / HOUR) % HOURS)
        day = int((np.floor(t / DAY) + 3.0) % WEEKDAYS)
        k[0], k[1], k[2] = s[K_POINT], s[K_SHIFT], s[K_DIVERGENCE]
        if adjusted:  # the version's thresholds times the feedback multiples in force
            el = t - s[A_TIME]  # NaN without a time: the multiples do not fade
            fade = 2.0 ** (-el / s[A_HALF_LIFE]) if el > 0.0 else 1.0
            for j in range(3):
                m = math.exp(s[A_LOG + j] * fade) * s[A_HOURS + FEEDBACK_HOURS * j + hour]
                if s[A_CAP + j] > 0.0:
                    m = min(m, s[A_CAP + j])
                k[j] *= min(m, s[A_CEILING])
        season = s[DAILY + hour] * s[DAILY_ON] + s[WEEKLY + day] * s[WEEKLY_ON]
        y = x - season
        weight = s[SLOW_W]
        known = weight > 0.0  # else nothing is remembered: learn, do not judge
        mean = s[SLOW_MEAN]
        std = math.sqrt(max(s[SLOW_M2] / weight, 0.0)) if known else 0.0
        # On a flat baseline any change is infinitely surprising, no change is not.
        flat = not (std > 0.0 and math.isfinite(std))
        deviation = abs(y - mean)
        point = (
            (0.0 if deviation == 0.0 else MAX_SCORE) if flat else min(deviation / std, MAX_SCORE)
        )
        band = k[0] * std
        # A reading that failed the point test is learned clipped to the band (by the short
        # window and the baseline alike): a spike is the point test's and bends nothing.
        learned = y
        if known and s[EXCLUDE] > 0.0 and point > k[0] and math.isfinite(band):
            learned = min(max(y, mean - band), mean + band)
        fw = s[FAST_W]
        total = fw + w_fast
        safe = total if total > 0.0 else 1.0
        delta = learned - s[FAST_MEAN]
        s[FAST_M2] += delta * delta * fw * w_fast / safe
        s[FAST_MEAN] += delta * w_fast / safe
        s[FAST_W] = total
        edge = np.floor((learned - s[LOW]) / s[BIN_WIDTH]) + 1.0
        b_in = 0 if math.isnan(edge) or edge < 0.0 else int(min(edge, BINS + 1.0))
        s[FAST_HIST + b_in] += w_fast
        moved = abs(s[FAST_MEAN] - mean) * math.sqrt(total)
        shift = (0.0 if moved == 0.0 else MAX_SCORE) if flat else min(moved / std, MAX_SCORE)
        # G statistic 2·n·KL(fast ‖ slow): ~χ² with BINS + 1 degrees of freedom if the short
        # window were drawn from the long-run distribution (n = the fast window's weight).
        kl = 0.0
        for j in range(BINS + 2):
            p = s[FAST_HIST + j] / safe
            if p > MIN_SHARE:
                kl += p * math.log(p * (weight + PSEUDO_COUNT) / (s[SLOW_HIST + j] + prior))
        divergence = min(2.0 * total * max(kl, 0.0), MAX_SCORE)
        r1 = point / k[0]
        r2 = shift / k[1]
        r3 = divergence / k[2]
        ratio = min(max(r1, r2, r3), MAX_SCORE) if known else 0.0
        flagged = ratio > 1.0
        fired = 0
        level = ratio  # the fired test's statistic over the version's own threshold
        if flagged:
            fired = 1 if r1 >= r2 and r1 >= r3 else (2 if r2 >= r3 else 3)
            if adjusted:
                c = (K_POINT, K_SHIFT, K_DIVERGENCE)[fired - 1]
                level = min((point, shift, divergence)[fired - 1] / s[c], MAX_SCORE)
        raised = flagged and t - s[LAST_ALERT] > s[QUIET]
        if raised:
            s[LAST_ALERT] = t
        sw = s[SLOW_W]
        total = sw + w_slow
        safe = total if total > 0.0 else 1.0
        delta = learned - s[SLOW_MEAN]
        s[SLOW_M2] += delta * delta * sw * w_slow / safe
        s[SLOW_MEAN] += delta * w_slow / safe
        s[SLOW_W] = total
        s[SLOW_HIST + b_in] += w_slow
        # The profiles learn the residual the level does not explain, re-centred to sum to 0.
        residual = learned - mean if known else 0.0
        gain = s[DAILY_ON] * s[DAILY_RATE] * residual * w_slow
        if gain != 0.0:
            s[DAILY + hour] += gain
            for j in range(HOURS):
                s[DAILY + j] -= gain / HOURS
        gain = s[WEEKLY_ON] * s[WEEKLY_RATE] * residual * w_slow
        if gain != 0.0:
            s[WEEKLY + day] += gain
            for j in range(WEEKDAYS):
                s[WEEKLY + j] -= gain / WEEKDAYS
        expected = mean + season
        if flat:
            z = 0.0 if y == mean else math.copysign(MAX_SCORE, y - mean)
        else:
            z = (y - mean) / std
        if math.isnan(z):
            z = 0.0
        anomaly[i], alert[i], test[i] = flagged, raised, fired
        out[0, i], out[1, i] = expected, std
        out[2, i], out[3, i] = expected - band, expected + band
        out[4, i], out[5, i] = min(max(z, -MAX_SCORE), MAX_SCORE), ratio
        out[6, i] = level
        stats[i, 0], stats[i, 1], stats[i, 2] = point, shift, divergence


def expected_band(row: FloatArray, timestamps: Any) -> tuple[FloatArray, FloatArray, FloatArray]:
    """A state's expected value and point-test bounds at these instants (without learning)."""
    t = np.asarray(timestamps, dtype=np.float64)
    season = (
        row[DAILY + hour_of_day(t)] * row[DAILY_ON] + row[WEEKLY + day_of_week(t)] * row[WEEKLY_ON]
    )
    expected = row[SLOW_MEAN] + season
    std = math.sqrt(max(row[SLOW_M2] / row[SLOW_W], 0.0)) if row[SLOW_W] > 0 else 0.0
    band = row[K_POINT] * std
    return expected, expected - band, expected + band


# The threshold columns, in ``detector.feedback.TESTS``' order.
ADJUSTED: Final = (K_POINT, K_SHIFT, K_DIVERGENCE)


def thresholds(row: FloatArray) -> tuple[float, ...]:
    """A state's point, shift and divergence thresholds."""
    return tuple(float(row[c]) for c in ADJUSTED)


def apply_adjustment(row: FloatArray, base: Sequence[float], scales: Sequence[float]) -> None:
    """Set a state's thresholds, in place, to ``base`` (``thresholds`` of its fitted state)
    times static per-test ``scales``. Idempotent: they never compound, however often it is
    applied. States adjusted before fading and hour multiples carry their scales this way
    (``SeasonalKind.adjust`` undoes them); feedback now goes through ``with_adjustment``."""
    for column, b, s in zip(ADJUSTED, base, scales, strict=True):
        row[column] = b * s


def with_adjustment(row: FloatArray, vector: Sequence[float]) -> FloatArray:
    """A new row: ``row``'s own ``WIDTH`` columns and, unless ``vector`` is empty (the
    identity), the feedback adjustment ``vector`` (``Adjustment.vector()``) after them. The
    worker and the evaluation both adjust a state through this one function."""
    plain = np.array(row[:WIDTH], dtype=np.float64)
    if not len(vector):
        return plain
    if len(vector) != VECTOR_LENGTH:
        raise ValueError(f"an adjustment vector has {VECTOR_LENGTH} floats, not {len(vector)}")
    return np.concatenate([plain, np.asarray(vector, dtype=np.float64)])


def adjustment_of(row: FloatArray) -> tuple[float, ...]:
    """The adjustment vector a row carries (() for none)."""
    return tuple(float(v) for v in row[WIDTH:])


# The static scales of a state no older worker adjusted.
_UNIT_SCALES: Final = (1.0,) * len(ADJUSTED)
# What a row without feedback carries when it is folded beside rows with some.
_IDENTITY_BLOCK: Final = Adjustment().layout()


def encode_state(row: FloatArray) -> str:
    """A state row as text (base64 of its float64 bytes)."""
    return base64.b64encode(np.ascontiguousarray(row, dtype="<f8").tobytes()).decode()


def decode_state(text: str) -> FloatArray:
    raw = base64.b64decode(text)
    if len(raw) not in (STATE_BYTES, ADJUSTED_BYTES):
        raise ValueError(
            f"a seasonal state is {STATE_BYTES} bytes ({ADJUSTED_BYTES} with a feedback"
            f" adjustment), not {len(raw)}"
        )
    return np.frombuffer(raw, dtype="<f8").copy()


def describe(row: FloatArray) -> dict[str, Any]:
    """The state in words (for tools and docs): scales in seconds, profiles, baseline."""
    return {
        **{name: float(row[i]) for name, i in _COL.items()},
        "daily": row[DAILY : DAILY + HOURS].tolist(),
        "weekly": row[WEEKLY : WEEKLY + WEEKDAYS].tolist(),
    }


def replay(
    series: Sequence[tuple[FloatArray, FloatArray, int]], params: SeasonalParams | None = None
) -> list[Folded]:
    """Offline: fit each series on its first ``n_fit`` readings and fold the rest, all series
    at once through ``fold`` (the stream's own function), in timestamp order per series."""
    bank = np.stack([fit_state(ts[:n], xs[:n], params) for ts, xs, n in series])
    rows = np.concatenate(
        [np.full(len(ts) - n, r, dtype=np.intp) for r, (ts, _, n) in enumerate(series)]
    )
    ts_all = np.concatenate([ts[n:] for ts, _, n in series]).astype(np.float64)
    xs_all = np.concatenate([xs[n:] for _, xs, n in series]).astype(np.float64)
    folded = fold(bank, rows, ts_all, xs_all)
    cuts = np.cumsum([0] + [len(ts) - n for ts, _, n in series])
    return [
        Folded(
            **{
                name: getattr(folded, name)[a:b]
                for name in ("anomaly", "alert", "expected", "std", "lower", "upper", "score")
            },
            ratio=folded.ratio[a:b],
            test=folded.test[a:b],
        )
        for a, b in itertools.pairwise(cuts)
    ]


@dataclass(frozen=True, slots=True)
class SeasonalModel(StaticModel):
    """A seasonal version's stateless rule (μ, σ of the training data, the fit's k and
    direction) for REST predict, batch predict and pinned readings; its stream state starts
    from the row fitted into the version's params."""

    kind: ClassVar[str] = "seasonal"


class SeasonalKind:
    """Seasonal baseline with point, shift and distribution tests, alerts a quiet period
    apart; state vectorised across series (``fold``)."""

    name: ClassVar[str] = "seasonal"
    stateful: ClassVar[bool] = True

    def __init__(self, params: SeasonalParams | None = None) -> None:
        self.params = params or SeasonalParams()

    def fit(self, data: TrainingData, options: FitOptions) -> Fitted:
        rule = fit_static(data, sigma=options.sigma, direction=options.direction)
        row = fit_state(data.timestamps, data.values, self.params)
        model = SeasonalModel(rule.mean, rule.std, rule.sigma, rule.direction)
        return Fitted(model, {"state": encode_state(row), "params": self.params.to_dict()})

    def score(self, model: StaticModel, values: Any) -> Verdicts:
        return model.score(values)

    def initial_state(self, params: dict[str, Any]) -> FloatArray:
        return decode_state(params["state"])

    def fold(
        self,
        states: Sequence[FloatArray],
        rows: IntArray,
        timestamps: FloatArray,
        values: FloatArray,
    ) -> tuple[list[FloatArray], Folded]:
        # One copy end to end (np.stack checks and copies each row: ~9x slower at 1,000 rows); a
        # row of another width fails the reshape.
        if all(len(s) == WIDTH for s in states):
            bank = (
                np.concatenate(states).reshape(len(states), WIDTH)
                if len(states)
                else np.zeros((0, WIDTH))
            )
            folded = fold(bank, rows, timestamps, values)
            return list(bank), folded
        # Some series carry feedback: the others get the identity's adjustment for the fold,
        # and are handed back as wide as they came.
        bank = np.empty((len(states), ADJUSTED_WIDTH))
        identity = np.asarray(_IDENTITY_BLOCK)
        for i, s in enumerate(states):
            if len(s) == ADJUSTED_WIDTH:
                bank[i] = s
            elif len(s) == WIDTH:
                bank[i, :WIDTH], bank[i, WIDTH:] = s, identity
            else:
                raise ValueError(f"a seasonal state has {WIDTH} or {ADJUSTED_WIDTH} floats")
        folded = fold(bank, rows, timestamps, values)
        return [
            row if len(s) == ADJUSTED_WIDTH else row[:WIDTH]
            for row, s in zip(bank, states, strict=True)
        ], folded

    def baseline(
        self, params: dict[str, Any], timestamps: FloatArray
    ) -> tuple[FloatArray, FloatArray, FloatArray]:
        return expected_band(decode_state(params["state"]), timestamps)

    def adjust(
        self, state: FloatArray, applied: Sequence[float], wanted: Sequence[float]
    ) -> FloatArray:
        """``state`` with the feedback adjustment ``wanted`` (``Adjustment.vector()``; ():
        none; three floats: static scales) in place of the one it carries. ``applied`` are
        static scales an older worker multiplied into the thresholds (``apply_adjustment``),
        undone here; the state itself is returned when nothing changes."""
        if len(wanted) == len(ADJUSTED):
            wanted = Adjustment.from_scales(wanted).vector()
        legacy = tuple(applied) != _UNIT_SCALES
        if not legacy and len(state) - WIDTH == len(wanted):
            # (no feedback, the common case, is answered without a slice of the state)
            if not len(wanted) or np.array_equal(state[WIDTH:], wanted, equal_nan=True):
                return state
        row = np.array(state[:WIDTH], dtype=np.float64, copy=True)
        if legacy:
            base = [t / a for t, a in zip(thresholds(row), applied, strict=True)]
            apply_adjustment(row, base, (1.0,) * len(ADJUSTED))
        return with_adjustment(row, wanted)

    def encode_state(self, state: FloatArray) -> str:
        return encode_state(state)

    def prepare(self) -> None:
        """Load the compiled fold (numba, its disk cache and what its first call loads: about
        two seconds) by folding one reading into a throwaway state: numba loads a function's
        machine code for its argument types at the first call, not when it is declared."""
        _compiled()
        steps = np.arange(8, dtype=np.float64) * 60.0
        bank = fit_state(steps, np.arange(8, dtype=np.float64)).reshape(1, WIDTH)
        fold(bank, np.zeros(1, dtype=np.intp), steps[-1:] + 60.0, np.zeros(1))

    def decode_state(self, data: str) -> FloatArray:
        return decode_state(data)
