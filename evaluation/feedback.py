"""The feedback protocol: NAB replayed in event time with a user who labels what they see.

Each file is fitted as ``POST /fit`` fits the seasonal kind (its probationary rows, the
stream's rows) and its later readings are folded one series at a time through
``detector.kinds.seasonal.fold``, the worker's function. The simulated user

- marks an alert raised outside every labelled window ``false_positive`` at that moment
  (with what the alert's event carries: the test that fired, its ``base_score`` and the
  reading's timestamp);
- marks a labelled window that ended without an alert inside it ``missed``, at its end (the
  range's last timestamp);

and the series' adjustment (``detector.feedback.adjustment``, the service's rule) is applied
from the next reading on (``detector.kinds.seasonal.with_adjustment``, as the worker's
``SeasonalKind.adjust``), as a worker applies it after ``MODEL_REFRESH_SECONDS``.

The fold runs in chunks on a copy of the state; a chunk in which feedback falls is folded
again from its start up to that reading only, so the state the next reading meets is exactly
the one a reading-by-reading replay would reach.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from detector.errors import InvalidInputError
from detector.feedback import DEFAULT_RULE, IDENTITY, TESTS, Feedback, FeedbackRule, step
from detector.kinds import seasonal
from detector.kinds.base import FitOptions, Folded
from detector.kinds.seasonal import SeasonalKind, SeasonalParams
from detector.kinds.training import prepare_training_data
from evaluation.corpus import Corpus, Series, load_named
from evaluation.nab import FloatArray, probationary_length
from evaluation.replay import stream_rows

# Readings folded per trial chunk (a chunk with feedback in it is folded twice).
CHUNK = 512


@dataclass(frozen=True, slots=True)
class FileRun:
    """One file's replay under the protocol."""

    alerts: FloatArray  # NAB's anomaly_score column: 1.0 on an alert, else 0.0
    false_positives: int  # alerts outside every window (scored rows)
    missed: int  # scored windows without an alert
    feedback: tuple[Feedback, ...] = ()


@dataclass(frozen=True, slots=True)
class CorpusRun:
    files: dict[str, FileRun] = field(default_factory=dict)

    @property
    def outputs(self) -> dict[str, FloatArray]:
        return {name: run.alerts for name, run in self.files.items()}

    @property
    def false_positives(self) -> int:
        return sum(run.false_positives for run in self.files.values())

    @property
    def missed(self) -> int:
        return sum(run.missed for run in self.files.values())

    def count(self, label: str) -> int:
        return sum(1 for run in self.files.values() for f in run.feedback if f.label == label)

    def subset(self, names: Iterable[str]) -> CorpusRun:
        return CorpusRun({name: self.files[name] for name in names})


def _window_of_rows(series: Series) -> np.ndarray:
    window = np.full(len(series), -1, dtype=np.intp)
    for k, (start, end) in enumerate(series.windows):
        window[start : end + 1] = k
    return window


def _fold(state: FloatArray, ts: FloatArray, xs: FloatArray) -> tuple[FloatArray, Folded]:
    bank = state.reshape(1, -1).copy()
    folded = seasonal.fold(bank, np.zeros(ts.size, dtype=np.intp), ts, xs)
    return bank[0], folded


def replay_file(
    series: Series, params: SeasonalParams | None, rule: FeedbackRule | None
) -> FileRun:
    """One file under the protocol (``rule`` None: no feedback, the plain replay)."""
    ts_all = series.seconds.astype(np.float64)
    keep = stream_rows(ts_all)
    n_fit = probationary_length(ts_all.size)
    fit_rows = np.flatnonzero(keep[:n_fit])
    rows = np.flatnonzero(keep[n_fit:]) + n_fit
    window = _window_of_rows(series)
    alerts = np.zeros(len(series))
    kind = SeasonalKind(params)
    try:
        data = prepare_training_data(ts_all[fit_rows].astype(np.int64), series.values[fit_rows])
        state = kind.initial_state(kind.fit(data, FitOptions()).params)
    except (InvalidInputError, ValueError):  # refused as POST /fit refuses it: no alerts
        unseen = {int(k) for k in window[n_fit:] if k >= 0}
        return FileRun(alerts, 0, len(unseen))
    ts, xs, win = ts_all[rows], series.values[rows], window[rows]
    # Per window with streamed rows: the position of its last streamed reading.
    ends = sorted({int(np.flatnonzero(win == k)[-1]): k for k in np.unique(win[win >= 0])}.items())
    raised = np.zeros(rows.size, dtype=bool)
    history: list[Feedback] = []
    current = IDENTITY
    pos, next_end = 0, 0
    while pos < rows.size:
        while next_end < len(ends) and ends[next_end][0] < pos:
            next_end += 1
        stop = min(pos + CHUNK, rows.size)
        if next_end < len(ends):
            stop = min(stop, ends[next_end][0] + 1)
        trial, folded = _fold(state, ts[pos:stop], xs[pos:stop])
        if rule is not None:
            false = np.flatnonzero(folded.alert & (win[pos:stop] < 0))
            if false.size:
                j = int(false[0])
                if j + 1 < stop - pos:
                    trial, folded = _fold(state, ts[pos : pos + j + 1], xs[pos : pos + j + 1])
                raised[pos : pos + j + 1] = folded.alert
                state, pos = trial, pos + j + 1
                level = folded.ratio[j] if folded.level is None else folded.level[j]
                item = Feedback(
                    "false_positive",
                    TESTS[int(folded.test[j]) - 1],
                    time=float(ts[pos - 1]),
                    level=float(level),
                )
                history.append(item)
                current = step(current, item, rule)
                state = seasonal.with_adjustment(state, current.vector())
                continue
        raised[pos:stop] = folded.alert
        state, pos = trial, stop
        if rule is not None and next_end < len(ends) and ends[next_end][0] == stop - 1:
            k = ends[next_end][1]
            if not raised[win == k].any():
                item = Feedback("missed", time=float(ts[stop - 1]))
                history.append(item)
                current = step(current, item, rule)
                state = seasonal.with_adjustment(state, current.vector())
    alerts[rows] = raised
    alerted_windows = {int(k) for k in win[raised] if k >= 0}
    scored = {int(k) for k in window[n_fit:] if k >= 0}
    return FileRun(
        alerts,
        false_positives=int(np.sum(raised & (win < 0))),
        missed=len(scored - alerted_windows),
        feedback=tuple(history),
    )


def replay_corpus(
    corpus: Corpus,
    params: SeasonalParams | None = None,
    rule: FeedbackRule | None = DEFAULT_RULE,
    names: Sequence[str] | None = None,
) -> CorpusRun:
    """Every file (or ``names``) under the protocol."""
    chosen = set(names) if names is not None else None
    return CorpusRun(
        {s.name: replay_file(s, params, rule) for s in corpus if chosen is None or s.name in chosen}
    )


def corpus_job(
    args: tuple[str, Path | None, SeasonalParams | None, FeedbackRule | None],
) -> CorpusRun:
    """``replay_corpus`` of a named corpus (a process pool's unit of work)."""
    corpus_name, root, params, rule = args
    return replay_corpus(load_named(corpus_name, root), params, rule)


def errors(corpus: Corpus, outputs: dict[str, FloatArray]) -> tuple[int, int]:
    """False positives (alerts outside every window) and missed windows (scored windows
    without an alert) of NAB-format outputs, on the scored rows."""
    false_positives = missed = 0
    for series in corpus:
        n_fit = probationary_length(len(series))
        window = _window_of_rows(series)[n_fit:]
        alerted = outputs[series.name][n_fit:] > 0.5
        false_positives += int(np.sum(alerted & (window < 0)))
        scored = {int(k) for k in window if k >= 0}
        missed += len(scored - {int(k) for k in window[alerted] if k >= 0})
    return false_positives, missed
