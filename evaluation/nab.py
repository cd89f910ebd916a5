"""NAB's scoring method: windowed, sigmoid-weighted detections, profiles and normalisation."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from evaluation.corpus import Corpus, Series

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

PROBATION_PERCENT = 0.15
# NAB caps the probationary period at probationPercent · 5000 rows (750 at 15 %).
PROBATION_CAP_ROWS = 5000
# The sweep starts above every legal score (NAB's are in [0, 1]): "flag nothing".
NOTHING_THRESHOLD = 1.1
# What NAB's null detector emits for every row.
NULL_SCORE = 0.5


@dataclass(frozen=True, slots=True)
class Profile:
    """An application profile: the weights of NAB's cost matrix."""

    name: str
    tp_weight: float
    fp_weight: float
    fn_weight: float
    tn_weight: float = 1.0  # part of NAB's matrix, unused by its score (kept for the record)


PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile("standard", tp_weight=1.0, fp_weight=0.11, fn_weight=1.0),
        Profile("reward_low_FP_rate", tp_weight=1.0, fp_weight=0.22, fn_weight=1.0),
        Profile("reward_low_FN_rate", tp_weight=1.0, fp_weight=0.11, fn_weight=2.0),
    )
}


def probationary_length(n_rows: int, percent: float = PROBATION_PERCENT) -> int:
    """Rows at the start of a file that NAB never scores: min(⌊0.15·n⌋, 750)."""
    limit = min(math.floor(percent * n_rows), percent * PROBATION_CAP_ROWS)
    # NAB compares the row index with this limit, so a fractional cap rounds up.
    return math.ceil(limit)


def scaled_sigmoid(position: FloatArray | float) -> FloatArray:
    """2/(1+e^{5x}) − 1: ≈0.987 at a window's start (x=−1), 0 at its end, → −1 after it.

    Beyond three window-widths past a window NAB uses exactly −1.
    """
    x = np.asarray(position, dtype=np.float64)
    with np.errstate(over="ignore"):  # e^{5x} overflows to inf far right: the value is −1
        value = 2.0 / (1.0 + np.exp(5.0 * x)) - 1.0
    return np.where(x > 3.0, -1.0, value)


@dataclass(frozen=True, slots=True)
class Sweep:
    """What a detection at each row of one file would earn under one profile."""

    name: str
    weight: FloatArray  # TP weight inside a window, (negative) FP weight outside
    window: IntArray  # index of the row's window in the file, −1 outside any window
    scorable: BoolArray  # False during the probationary period
    scored_windows: int  # windows with at least one scorable row


def sweep_file(
    n_rows: int,
    windows: Iterable[tuple[int, int]],
    profile: Profile,
    name: str = "",
) -> Sweep:
    """Per-row weights for a file of ``n_rows`` rows with inclusive row-index ``windows``.

    Inside a window of width w ending at row r, row i sits at −(r − i + 1)/w (−1 at the start)
    and earns tp·σ(pos)/σ(−1), so the earliest detection earns exactly tp. Outside, a row
    costs fp·σ(d/(w′ − 1)) with d the distance past the preceding window (width w′): barely
    anything just after it, the full fp far from it; before the first window it costs fp.
    """
    windows = sorted(windows)
    weight = np.full(n_rows, -profile.fp_weight, dtype=np.float64)
    window = np.full(n_rows, -1, dtype=np.int64)
    max_tp = float(scaled_sigmoid(-1.0))
    for k, (start, end) in enumerate(windows):
        if not 0 <= start <= end < n_rows:
            raise ValueError(f"{name}: window {(start, end)} outside rows 0..{n_rows - 1}")
        width = end - start + 1
        if width < 2:
            # NAB divides by (width − 1) for the rows after a window.
            raise ValueError(f"{name}: NAB cannot score a one-row window at {start}")
        rows = np.arange(start, end + 1)
        weight[start : end + 1] = (
            scaled_sigmoid(-(end - rows + 1) / width) * profile.tp_weight / max_tp
        )
        window[start : end + 1] = k
        following = windows[k + 1][0] if k + 1 < len(windows) else n_rows
        if following <= end:
            raise ValueError(f"{name}: windows overlap")
        after = np.arange(end + 1, following)
        weight[end + 1 : following] = (
            scaled_sigmoid((after - end) / (width - 1)) * profile.fp_weight
        )
    scorable = np.arange(n_rows) >= probationary_length(n_rows)
    scored_windows = len(np.unique(window[scorable & (window >= 0)]))
    return Sweep(name, weight, window, scorable, scored_windows)


@dataclass(frozen=True, slots=True)
class FileScore:
    """One file's raw NAB score at a threshold, with NAB's row counts (scorable rows only)."""

    name: str
    score: float
    tp: int
    tn: int
    fp: int
    fn: int

    @property
    def total(self) -> int:
        return self.tp + self.tn + self.fp + self.fn


def score_detections(sweep: Sweep, detected: BoolArray, profile: Profile) -> FileScore:
    """Raw score of a boolean detection vector: the best (earliest) detection of each window
    counts once, a window without one costs fn, every detection outside a window costs its
    FP weight."""
    detected = np.asarray(detected, dtype=bool)
    if detected.shape != sweep.weight.shape:
        raise ValueError(f"{sweep.name}: {detected.size} scores for {sweep.weight.size} rows")
    live = detected & sweep.scorable
    outside = sweep.window < 0
    score = float(np.sum(sweep.weight[live & outside]))
    for k in np.unique(sweep.window[sweep.scorable & ~outside]):
        hits = live & (sweep.window == k)
        score += float(np.max(sweep.weight[hits])) if hits.any() else -profile.fn_weight
    in_window = sweep.scorable & ~outside
    tp = int(np.sum(live & ~outside))
    fp = int(np.sum(live & outside))
    return FileScore(
        sweep.name,
        score,
        tp=tp,
        tn=int(np.sum(sweep.scorable & outside)) - fp,
        fp=fp,
        fn=int(np.sum(in_window)) - tp,
    )


@dataclass(frozen=True, slots=True)
class ThresholdCurve:
    """Corpus total score for every distinct threshold, highest threshold first."""

    thresholds: FloatArray
    totals: FloatArray

    def best(self) -> tuple[float, float]:
        """(threshold, score) maximising the score; ties go to the highest threshold, as in
        NAB's optimiser (a stable sort on the score of a list ordered by falling threshold)."""
        i = int(np.argmax(self.totals))
        return float(self.thresholds[i]), float(self.totals[i])


def threshold_curve(
    sweeps: Iterable[Sweep], scores: Iterable[FloatArray], profile: Profile
) -> ThresholdCurve:
    """Score every threshold at once: rows become detections in order of falling anomaly
    score, and the total moves by each row's FP weight or by the rise in its window's best TP.
    A threshold t flags rows whose score is ≥ t."""
    weights, windows, values = [], [], []
    window_offset, scored_windows = 0, 0
    for sweep, score in zip(sweeps, scores, strict=True):
        score = np.asarray(score, dtype=np.float64)
        if score.shape != sweep.weight.shape:
            raise ValueError(f"{sweep.name}: {score.size} scores for {sweep.weight.size} rows")
        if np.any(~np.isfinite(score)) or np.any((score < 0) | (score > 1)):
            raise ValueError(f"{sweep.name}: anomaly scores must be in [0, 1]")
        keep = sweep.scorable
        window = sweep.window[keep]
        weights.append(sweep.weight[keep])
        windows.append(np.where(window >= 0, window + window_offset, -1))
        values.append(score[keep])
        window_offset += len(np.unique(sweep.window)) + 1  # any gap-free unique offset will do
        scored_windows += sweep.scored_windows
    weight, window, value = np.concatenate(weights), np.concatenate(windows), np.concatenate(values)
    order = np.argsort(-value, kind="stable")
    weight, window, value = weight[order], window[order], value[order]

    delta = np.where(window < 0, weight, 0.0)
    in_window = np.flatnonzero(window >= 0)
    by_window = in_window[np.argsort(window[in_window], kind="stable")]
    bounds = np.flatnonzero(np.diff(window[by_window])) + 1
    for rows in np.split(by_window, bounds):
        if rows.size == 0:
            continue
        best = np.maximum.accumulate(np.concatenate(([-profile.fn_weight], weight[rows])))
        delta[rows] = np.diff(best)

    base = -profile.fn_weight * scored_windows
    running = base + np.cumsum(delta)
    ends = np.flatnonzero(np.append(value[1:] != value[:-1], True))
    return ThresholdCurve(
        thresholds=np.concatenate(([NOTHING_THRESHOLD], value[ends])),
        totals=np.concatenate(([base], running[ends])),
    )


@dataclass(frozen=True, slots=True)
class CorpusScore:
    """A detector's NAB result for one profile."""

    profile: str
    threshold: float
    raw: float
    null: float  # raw score of NAB's null detector (normalises to 0)
    perfect: float  # raw score of a perfect detector (normalises to 100)
    files: tuple[FileScore, ...]

    @property
    def normalized(self) -> float:
        return 100.0 * (self.raw - self.null) / (self.perfect - self.null)


class NabScorer:
    """Scores anomaly-score vectors over a corpus; caches each profile's per-row weights."""

    def __init__(self, corpus: Corpus) -> None:
        self.corpus = corpus
        self._sweeps: dict[str, list[Sweep]] = {}

    def sweeps(self, profile: Profile) -> list[Sweep]:
        if profile.name not in self._sweeps:
            self._sweeps[profile.name] = [
                sweep_file(len(s), s.windows, profile, s.name) for s in self.corpus
            ]
        return self._sweeps[profile.name]

    def null_score(self, profile: Profile) -> float:
        """NAB's null detector: a constant score, its threshold optimised like any other."""
        constant = [np.full(len(s), NULL_SCORE) for s in self.corpus]
        return threshold_curve(self.sweeps(profile), constant, profile).best()[1]

    def perfect_score(self, profile: Profile) -> float:
        # NAB counts every labelled window, whether or not the probation hides it.
        return self.corpus.window_count * profile.tp_weight

    def curve(self, scores: Mapping[str, FloatArray], profile: Profile) -> ThresholdCurve:
        return threshold_curve(self.sweeps(profile), self._ordered(scores), profile)

    def score(
        self,
        scores: Mapping[str, FloatArray],
        profile: Profile,
        threshold: float | None = None,
    ) -> CorpusScore:
        """Score at ``threshold``, or at the corpus-wide optimum when it is None (NAB's
        optimiser): one threshold for every file of the corpus."""
        if threshold is None:
            threshold = self.curve(scores, profile).best()[0]
        files = tuple(
            score_detections(sweep, np.asarray(values) >= threshold, profile)
            for sweep, values in zip(self.sweeps(profile), self._ordered(scores), strict=True)
        )
        return CorpusScore(
            profile=profile.name,
            threshold=threshold,
            raw=sum(f.score for f in files),
            null=self.null_score(profile),
            perfect=self.perfect_score(profile),
            files=files,
        )

    def _ordered(self, scores: Mapping[str, FloatArray]) -> list[FloatArray]:
        missing = [s.name for s in self.corpus if s.name not in scores]
        if missing:
            raise KeyError(f"no anomaly scores for {', '.join(missing[:3])}")
        return [np.asarray(scores[s.name], dtype=np.float64) for s in self.corpus]


def perfect_scores(series: Series) -> FloatArray:
    """The perfect detector's output: 1.0 at the first row of every window, 0 elsewhere."""
    out = np.zeros(len(series))
    for start, _ in series.windows:
        out[start] = 1.0
    return out
