"""``python -m evaluation``: replay detector kinds over a corpus offline, score them, print tables.

Parameters are only ever chosen on NAB (in-sample, or leave-one-folder-out). The second corpus
(``--corpus skab``) is held out by construction: it is only scored, and every selection
function here calls ``Corpus.require_tunable`` first, which refuses it.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from detector.errors import InvalidInputError
from detector.feedback import DEFAULT_RULE, FeedbackRule
from detector.kinds import seasonal
from detector.kinds.base import FitOptions
from detector.kinds.multiscale import MultiscaleParams, group_alerts
from detector.kinds.seasonal import SeasonalKind, SeasonalParams, TimeScale
from detector.kinds.training import prepare_training_data
from evaluation.corpus import BENCH, CORPORA, Corpus, load_corpus, load_named
from evaluation.feedback import CorpusRun, corpus_job, errors
from evaluation.nab import PROFILES, CorpusScore, FloatArray, NabScorer, probationary_length
from evaluation.replay import (
    KIND_DEFAULTS,
    KIND_TABLE,
    detector_kind,
    multiscale_alerts,
    multiscale_components,
    replay_all,
    stream_rows,
)
from evaluation.results import read_results_dir, results_path, write_results

# Published NAB scoreboard (standard profile), numenta/NAB results/final_results.json.
SCOREBOARD: tuple[tuple[str, float], ...] = (
    ("ARTime", 74.9),
    ("Numenta HTM", 70.1),
    ("CAD-OSE", 69.9),
    ("earthgecko Skyline", 58.2),
    ("KNN-CAD", 58.0),
    ("Relative Entropy", 54.6),
    ("Random Cut Forest", 51.7),
    ("Windowed Gaussian", 39.6),
    ("random", 16.8),
    ("null", 0.0),
)
RESULTS_ROOT = BENCH / "results"
DEFAULT_RESULTS = RESULTS_ROOT / "nab"
# The corpus scored beside NAB, held out: it never chooses a parameter.
HELD_OUT_CORPUS = "skab"
# Our detectors emit alerts (1.0) or nothing (0.0): scored as flagged, not re-thresholded.
FLAG_THRESHOLD = 0.5

# Leave-one-folder-out grid, declared before looking at any held-out folder: k in σ, the
# baseline's half-life and the episode quiet period in days. Principle: for each folder, the
# point of this grid with the best standard-profile raw score on the *other* folders.
LOFO_GRID: dict[str, tuple[float, ...]] = {
    "k": (3.0, 4.0, 5.0),
    "half_life_days": (1.0, 7.0, 30.0),
    "quiet_days": (0.5, 1.0),
}

# The multiscale kind's grid, declared the same way: the short window's half-life needs a
# replay per value; thresholds and the quiet period (in readings) are swept on its output.
MULTISCALE_GRID: dict[str, tuple[float, ...]] = {
    "fast_readings": (3.0, 6.0, 12.0),
    "k_point": (6.0, 8.0),
    "k_shift": (4.0, 5.0, 6.0),
    "k_divergence": (30.0, 60.0, 100.0),
    "quiet_readings": (72.0, 144.0, 288.0),
}

# The seasonal kind's grid, declared the same way. The point threshold and the short window
# change what the state learns (a reading beyond k_point is learned clipped), so each pair is
# one replay; the other thresholds and the quiet period (a duration bounded to 12–144 readings,
# or 12–288 for a day) only read its statistics and are swept on them.
SEASONAL_REPLAYS: dict[str, tuple[Any, ...]] = {
    "k_point": (6.0, 8.0),
    "fast": (TimeScale(1800.0, 3.0, 6.0), TimeScale(3600.0, 3.0, 12.0)),
}
SEASONAL_SWEEP: dict[str, tuple[Any, ...]] = {
    "k_shift": (4.0, 5.0, 6.0),
    "k_divergence": (30.0, 60.0, 100.0),
    "quiet": (
        TimeScale(6 * 3600.0, 12.0, 144.0),
        TimeScale(12 * 3600.0, 12.0, 144.0),
        TimeScale(24 * 3600.0, 12.0, 288.0),
    ),
}

# The feedback rule's grid (``detector.feedback.FeedbackRule``), for the feedback protocol's
# leave-one-folder-out figure: for each folder, the rule best on the other six. Half-lives in
# seconds; an hour_widen of 1 switches the hour multiples off.
FEEDBACK_GRID: dict[str, tuple[float, ...]] = {
    "widen": (1.25, 1.5),
    "half_life": (7 * 86_400.0, 14 * 86_400.0, 30 * 86_400.0),
    "hour_widen": (1.0, 2.0),
    "margin": (1.2, 1.5),
}
# ``--static-feedback``: static per-test scales (no fading, no hours, no cap), the rule and grid
# the service had before fading, hour multiples and caps, as the reference they are measured
# against.
STATIC_RULE = FeedbackRule(
    widen=1.25, half_life=math.inf, hour_widen=1.0, margin=math.inf, max_scale=1.5
)
STATIC_FEEDBACK_GRID: dict[str, tuple[float, ...]] = {
    "widen": (1.1, 1.25, 1.5),
    "max_scale": (1.5, 2.0, 3.0),
    "narrow": (0.85, 1.0),
    "half_life": (math.inf,),
    "hour_widen": (1.0,),
    "margin": (math.inf,),
}


@dataclass(frozen=True, slots=True)
class Params:
    k: float | None = None
    quiet_days: float | None = None
    half_life_days: float | None = None
    direction: str | None = None


def run_detector(corpus: Corpus, kind_name: str, params: Params) -> dict[str, FloatArray]:
    kind = detector_kind(
        kind_name,
        k=params.k,
        quiet_days=params.quiet_days,
        half_life_days=params.half_life_days,
        direction=params.direction,  # type: ignore[arg-type]
    )
    series = list(corpus)
    found = replay_all(kind, [(s.seconds.astype(np.float64), s.values) for s in series])
    return {s.name: r.anomaly_scores for s, r in zip(series, found, strict=True)}


def _grid_point(args: tuple[Path, str, Params]) -> tuple[Params, dict[str, FloatArray]]:
    root, kind_name, params = args
    return params, run_detector(load_corpus(root), kind_name, params)


def lofo_grid(kind_name: str) -> list[Params]:
    """LOFO_GRID restricted to the parameters the kind takes (one point per distinct kind)."""
    takes = KIND_TABLE[kind_name].takes
    axes = [v if name in takes else (None,) for name, v in LOFO_GRID.items()]
    return [Params(k=k, half_life_days=h, quiet_days=q) for k, h, q in itertools.product(*axes)]


def has_lofo(kind_name: str) -> bool:
    """Whether the kind has a declared grid to choose from (references are fixed)."""
    spec = KIND_TABLE[kind_name]
    return kind_name in ("multiscale", "seasonal") or (not spec.reference and "k" in spec.takes)


def leave_one_folder_out(
    corpus: Corpus, root: Path, kind_name: str, jobs: int
) -> tuple[dict[str, FloatArray], dict[str, Params]]:
    """Outputs where each folder's files come from parameters chosen without that folder."""
    corpus.require_tunable()
    grid = lofo_grid(kind_name)
    scorer = NabScorer(corpus)
    raw_by_folder: list[dict[str, float]] = []
    outputs: list[dict[str, FloatArray]] = []
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        for _, out in pool.map(_grid_point, [(root, kind_name, p) for p in grid]):
            raw_by_folder.append(_score_by_folder(corpus, scorer, out))
            outputs.append(out)
    return _choose_without_each_folder(corpus, grid, raw_by_folder, outputs)


P = TypeVar("P")


def _score_by_folder(
    corpus: Corpus, scorer: NabScorer, out: dict[str, FloatArray]
) -> dict[str, float]:
    """The raw standard-profile score of one grid point's outputs, summed per folder."""
    folder_of = {s.name: s.folder for s in corpus}
    per_folder: dict[str, float] = dict.fromkeys(corpus.folders, 0.0)
    for f in scorer.score(out, PROFILES["standard"], FLAG_THRESHOLD).files:
        per_folder[folder_of[f.name]] += f.score
    return per_folder


def _choose_without_each_folder(
    corpus: Corpus,
    grid: Sequence[P],
    raw_by_folder: list[dict[str, float]],
    outputs: list[dict[str, FloatArray]],
) -> tuple[dict[str, FloatArray], dict[str, P]]:
    """For each folder, the grid point best on the *other* folders; its outputs for that one."""
    corpus.require_tunable()
    folder_of = {s.name: s.folder for s in corpus}
    combined: dict[str, FloatArray] = {}
    chosen: dict[str, P] = {}
    for folder in corpus.folders:
        others = [sum(v for f, v in r.items() if f != folder) for r in raw_by_folder]
        best = int(np.argmax(others))
        chosen[folder] = grid[best]
        combined.update({n: v for n, v in outputs[best].items() if folder_of[n] == folder})
    return combined, chosen


def _components(
    args: tuple[Path, float],
) -> tuple[float, dict[str, tuple[FloatArray, float]]]:
    root, fast = args
    params = MultiscaleParams(fast_readings=fast)
    corpus = load_corpus(root)
    return fast, {
        s.name: multiscale_components(params, s.seconds.astype(np.float64), s.values)
        for s in corpus
    }


def multiscale_leave_one_folder_out(
    corpus: Corpus, root: Path, jobs: int
) -> tuple[dict[str, FloatArray], dict[str, MultiscaleParams]]:
    """``leave_one_folder_out`` for the multiscale kind over MULTISCALE_GRID."""
    corpus.require_tunable()
    scorer = NabScorer(corpus)
    fasts = MULTISCALE_GRID["fast_readings"]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        components = dict(pool.map(_components, [(root, f) for f in fasts]))
    grid: list[MultiscaleParams] = []
    raw_by_folder: list[dict[str, float]] = []
    outputs: list[dict[str, FloatArray]] = []
    for values in itertools.product(*MULTISCALE_GRID.values()):
        fast, k_point, k_shift, k_divergence, quiet = values
        params = MultiscaleParams(
            fast_readings=fast,
            k_point=k_point,
            k_shift=k_shift,
            k_divergence=k_divergence,
            quiet_readings=quiet,
        )
        out = {
            s.name: multiscale_alerts(
                *components[params.fast_readings][s.name], s.seconds.astype(np.float64), params
            ).astype(np.float64)
            for s in corpus
        }
        grid.append(params)
        raw_by_folder.append(_score_by_folder(corpus, scorer, out))
        outputs.append(out)
    return _choose_without_each_folder(corpus, grid, raw_by_folder, outputs)


def _seasonal_statistics(
    args: tuple[str, Path | None, SeasonalParams],
) -> tuple[SeasonalParams, dict[str, tuple[FloatArray, FloatArray, float, int]]]:
    """Every series of the corpus fitted as the service fits the seasonal kind with
    ``params`` and folded at once through ``detector.kinds.seasonal.fold``: per series, the
    rows scored, their three statistics, the cadence and the first row scored."""
    corpus_name, root, params = args
    corpus = load_named(corpus_name, root)
    kind = SeasonalKind(params)
    fitted: list[tuple[str, FloatArray, FloatArray, FloatArray]] = []
    for series in corpus:
        ts = series.seconds.astype(np.float64)
        keep = stream_rows(ts)
        n_fit = probationary_length(ts.size)
        fit_rows = np.flatnonzero(keep[:n_fit])
        rows = np.flatnonzero(keep[n_fit:]) + n_fit
        try:
            data = prepare_training_data(ts[fit_rows].astype(np.int64), series.values[fit_rows])
            state = kind.initial_state(kind.fit(data, FitOptions()).params)
        except (InvalidInputError, ValueError):
            continue  # refused as POST /fit refuses it: no model, no alerts
        fitted.append((series.name, state, rows, ts))
    bank = np.stack([state for _, state, _, _ in fitted])
    index = np.concatenate(
        [np.full(rows.size, i, dtype=np.intp) for i, (_, _, rows, _) in enumerate(fitted)]
    )
    ts_all = np.concatenate([ts[rows] for _, _, rows, ts in fitted])
    values = {s.name: s.values for s in corpus}
    xs_all = np.concatenate([values[name][rows] for name, _, rows, _ in fitted])
    statistics = np.zeros((index.size, 3))
    steps = bank[:, seasonal.STEP].copy()
    seasonal.fold(bank, index, ts_all, xs_all, statistics)
    cuts = np.cumsum([0] + [rows.size for _, _, rows, _ in fitted])
    return params, {
        name: (rows, statistics[a:b], float(steps[i]), 0)
        for i, ((name, _, rows, _), a, b) in enumerate(
            zip(fitted, cuts[:-1], cuts[1:], strict=True)
        )
    }


def seasonal_leave_one_folder_out(
    corpus: Corpus, root: Path, jobs: int
) -> tuple[dict[str, FloatArray], dict[str, dict[str, Any]]]:
    """``leave_one_folder_out`` for the seasonal kind over SEASONAL_REPLAYS × SEASONAL_SWEEP."""
    corpus.require_tunable()
    scorer = NabScorer(corpus)
    replays = [
        SeasonalParams(k_point=k_point, fast=fast)
        for k_point, fast in itertools.product(*SEASONAL_REPLAYS.values())
    ]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        found = list(pool.map(_seasonal_statistics, [(corpus.name, root, p) for p in replays]))
    seconds = {s.name: s.seconds.astype(np.float64) for s in corpus}
    grid: list[dict[str, Any]] = []
    raw_by_folder: list[dict[str, float]] = []
    outputs: list[dict[str, FloatArray]] = []
    for params, per_series in found:
        for k_shift, k_divergence, quiet in itertools.product(*SEASONAL_SWEEP.values()):
            out = {s.name: np.zeros(len(s)) for s in corpus}
            for name, (rows, stats, step, _) in per_series.items():
                anomalous = (
                    (stats[:, 0] > params.k_point)
                    | (stats[:, 1] > k_shift)
                    | (stats[:, 2] > k_divergence)
                )
                ts = seconds[name][rows]
                out[name][rows] = group_alerts(ts, anomalous, quiet.resolve(step))
            grid.append(
                {
                    "k_point": params.k_point,
                    "fast": params.fast,
                    "k_shift": k_shift,
                    "k_divergence": k_divergence,
                    "quiet": quiet,
                }
            )
            raw_by_folder.append(_score_by_folder(corpus, scorer, out))
            outputs.append(out)
    return _choose_without_each_folder(corpus, grid, raw_by_folder, outputs)


def _seasonal_params(choice: dict[str, Any]) -> SeasonalParams:
    """The seasonal setting of one point of the seasonal grid."""
    return SeasonalParams(
        k_point=choice["k_point"],
        fast=choice["fast"],
        k_shift=choice["k_shift"],
        k_divergence=choice["k_divergence"],
        quiet=choice["quiet"],
    )


def describe_rule(rule: FeedbackRule) -> str:
    fading = "none" if math.isinf(rule.half_life) else f"{rule.half_life / 86_400.0:g}d"
    margin = "none" if math.isinf(rule.margin) else f"{rule.margin:g}"
    return (
        f"widen={rule.widen:g} half_life={fading} hour_widen={rule.hour_widen:g}"
        f" margin={margin} narrow={rule.narrow:g} scales=[{rule.min_scale:g}, {rule.max_scale:g}]"
    )


def feedback_rules(grid: dict[str, tuple[float, ...]] | None = None) -> list[FeedbackRule]:
    grid = FEEDBACK_GRID if grid is None else grid
    return [
        FeedbackRule(**dict(zip(grid, point, strict=True)))
        for point in itertools.product(*grid.values())
    ]


@dataclass(frozen=True, slots=True)
class FeedbackFigures:
    """The feedback protocol beside the plain replay, in-sample and leave-one-folder-out."""

    in_sample: tuple[CorpusRun, CorpusRun]  # (no feedback, feedback with DEFAULT_RULE)
    lofo: tuple[dict[str, FloatArray], dict[str, FloatArray]] | None  # the same, LOFO
    choices: list[str]


def feedback_figures(
    corpus: Corpus,
    root: Path,
    jobs: int,
    with_lofo: bool,
    rule: FeedbackRule = DEFAULT_RULE,
    grid: dict[str, tuple[float, ...]] | None = None,
) -> FeedbackFigures:
    """The seasonal kind replayed under the feedback protocol (``evaluation.feedback``).

    In-sample with ``rule``. Leave-one-folder-out: each folder is scored with the seasonal
    setting the existing machinery chooses without it (``seasonal_leave_one_folder_out``)
    and, with feedback, the rule of ``grid`` (FEEDBACK_GRID) best on the other folders under
    that setting; so neither the kind's nor the rule's constants are chosen on the folder
    they are scored on.
    """
    corpus.require_tunable()
    jobs_in: list[tuple[str, Path | None, SeasonalParams | None, FeedbackRule | None]] = [
        (corpus.name, root, None, None),
        (corpus.name, root, None, rule),
    ]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        plain, adjusted = pool.map(corpus_job, jobs_in)
    if not with_lofo:
        return FeedbackFigures((plain, adjusted), None, [])
    swept, chosen = seasonal_leave_one_folder_out(corpus, root, jobs)
    settings = {repr(c): _seasonal_params(c) for c in chosen.values()}
    rules = feedback_rules(grid)
    work = [(key, r) for key in settings for r in (None, *rules)]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        runs = list(pool.map(corpus_job, [(corpus.name, root, settings[k], r) for k, r in work]))
    by_key = {(k, r): run for (k, r), run in zip(work, runs, strict=True)}
    scorer = NabScorer(corpus)
    folder_of = {s.name: s.folder for s in corpus}
    off: dict[str, FloatArray] = {}
    on: dict[str, FloatArray] = {}
    choices: list[str] = []
    for folder, choice in chosen.items():
        key = repr(choice)
        members = [n for n, f in folder_of.items() if f == folder]
        off.update({n: by_key[(key, None)].files[n].alerts for n in members})
        raw = [_score_by_folder(corpus, scorer, by_key[(key, r)].outputs) for r in rules]
        others = [sum(v for f, v in r.items() if f != folder) for r in raw]
        best = rules[int(np.argmax(others))]
        on.update({n: by_key[(key, best)].files[n].alerts for n in members})
        choices.append(f"  {folder:24s} {describe_rule(best)}")
    for name, alerts in off.items():  # the replay is the sweep's own outputs, per file
        if not np.array_equal(alerts, swept[name]):
            raise AssertionError(f"{name}: the replay differs from the seasonal sweep")
    return FeedbackFigures((plain, adjusted), (off, on), choices)


def run_feedback(
    corpus: Corpus, root: Path, jobs: int, with_lofo: bool, static: bool = False
) -> int:
    """``--feedback``: print the protocol's figures beside the plain replay (``static``: of
    STATIC_RULE and STATIC_FEEDBACK_GRID)."""
    started = time.perf_counter()
    rule = STATIC_RULE if static else DEFAULT_RULE
    grid = STATIC_FEEDBACK_GRID if static else FEEDBACK_GRID
    figures = feedback_figures(corpus, root, jobs, with_lofo, rule, grid)
    scorer = NabScorer(corpus)
    rows: list[tuple[str, dict[str, FloatArray]]] = [
        ("seasonal, no feedback (in-sample)", figures.in_sample[0].outputs),
        ("seasonal, feedback (in-sample)", figures.in_sample[1].outputs),
    ]
    if figures.lofo is not None:
        rows += [
            ("seasonal, no feedback (leave-one-folder-out)", figures.lofo[0]),
            ("seasonal, feedback (leave-one-folder-out)", figures.lofo[1]),
        ]
    header = (
        f"{'run':46s} {'standard':>8s} {'low FP':>7s} {'low FN':>7s}"
        f" {'false pos.':>10s} {'missed':>7s}"
    )
    lines = [header, "-" * len(header)]
    for label, outputs in rows:
        scores = score_profiles(scorer, outputs)
        fp, missed = errors(corpus, outputs)
        cells = " ".join(f"{scores[p].normalized:7.1f}" for p in PROFILES)
        lines.append(f"{label:46s} {cells} {fp:10d} {missed:7d}")
    print("\n".join(lines))
    adjusted = figures.in_sample[1]
    print(
        f"\nin-sample rule: {describe_rule(rule)};"
        f" feedback given: {adjusted.count('false_positive')}"
        f" false_positive, {adjusted.count('missed')} missed;"
        f" {corpus.window_count} windows; {time.perf_counter() - started:.0f} s."
    )
    if figures.choices:
        print("leave-one-folder-out feedback rule per held-out folder:")
        print("\n".join(figures.choices))
    return 0


Scores = dict[str, CorpusScore]


def score_profiles(scorer: NabScorer, outputs: dict[str, FloatArray]) -> Scores:
    return {p.name: scorer.score(outputs, p, FLAG_THRESHOLD) for p in PROFILES.values()}


def format_table(rows: Sequence[tuple[str, Scores | float]]) -> str:
    header = f"{'detector':58s} {'standard':>9s} {'low FP':>9s} {'low FN':>9s}"
    lines = [header, "-" * len(header)]
    for label, value in sorted(rows, key=_standard, reverse=True):
        if isinstance(value, dict):
            cells = [f"{value[p].normalized:9.1f}" for p in PROFILES]
            lines.append(f"{label:58s} {' '.join(cells)}")
        else:
            lines.append(f"{label:58s} {value:9.1f} {'':>9s} {'':>9s}")
    return "\n".join(lines)


def format_columns(
    groups: Sequence[str], rows: Sequence[tuple[str, Sequence[Scores | None]]]
) -> str:
    """One row per kind, one group of three profile columns per corpus or method, side by
    side (standard / low FP / low FN); "-" where a kind has no such figure."""
    width = max([20, *(len(g) for g in groups)])
    first = max([4, *(len(label) for label, _ in rows)])
    head = f"{'kind':{first}s}" + "".join(f" | {g:^{width}s}" for g in groups)
    sub = f"{'':{first}s}" + f" | {'std  lowFP  lowFN':^{width}s}" * len(groups)
    lines = [head, sub, "-" * len(head)]
    for label, cells in rows:
        parts = []
        for scores in cells:
            if scores is None:
                parts.append(f" | {'-':^{width}s}")
            else:
                values = " ".join(f"{scores[p].normalized:6.1f}" for p in PROFILES)
                parts.append(f" | {values:>{width}s}")
        lines.append(f"{label:{first}s}" + "".join(parts))
    return "\n".join(lines)


def _standard(row: tuple[str, Scores | float]) -> float:
    value = row[1]
    return value["standard"].normalized if isinstance(value, dict) else value


def describe(name: str, params: Params) -> str:
    """A kind's label with the settings it ran with."""
    d = KIND_DEFAULTS[name]
    takes = KIND_TABLE[name].takes
    shown: dict[str, object] = {}
    if name == "seasonal":
        p = SeasonalParams()
        shown = {
            "half-lives": f"{p.slow.seconds / 86400:g}d/{p.fast.seconds / 60:g}min",
            "k": f"{p.k_point:g}/{p.k_shift:g}/{p.k_divergence:g}",
            "quiet": f"{p.quiet.seconds / 3600:g}h",
        }
    if name == "multiscale":
        m = MultiscaleParams()
        shown = {
            "half-lives": f"{m.slow_readings:g}/{m.fast_readings:g}",
            "k": f"{m.k_point:g}/{m.k_shift:g}/{m.k_divergence:g}",
            "quiet": f"{m.quiet_readings:g}",
        }
    if "k" in takes:
        shown["k"] = params.k or d.k
    if "direction" in takes:
        shown["dir"] = params.direction or d.direction
    if "quiet_days" in takes:
        shown["quiet"] = f"{params.quiet_days or d.quiet_days}d"
    if "half_life_days" in takes:
        shown["half-life"] = f"{params.half_life_days or d.half_life_days}d"
    tag = "reference" if KIND_TABLE[name].reference else "ours"
    return f"{name} ({tag}) " + " ".join(f"{k}={v}" for k, v in shown.items())


def write_outputs(
    corpus: Corpus, scorer: NabScorer, results: Path, name: str, outputs: dict[str, FloatArray]
) -> None:
    """NAB-format per-file outputs (with NAB's S(t) columns) under ``results/name``."""
    for index, series in enumerate(corpus):
        extra = {f"S(t)_{p.name}": scorer.sweeps(p)[index].weight for p in PROFILES.values()}
        write_results(results_path(results, name, series.name), series, outputs[series.name], extra)


def lofo(
    corpus: Corpus, root: Path, kind_name: str, jobs: int
) -> tuple[dict[str, FloatArray], list[str]] | None:
    """A kind's leave-one-folder-out outputs and its per-folder choices, or None when the
    kind has no grid to choose from."""
    if not has_lofo(kind_name):
        return None
    if kind_name == "seasonal":
        combined, chosen_s = seasonal_leave_one_folder_out(corpus, root, jobs)
        return combined, [
            f"  {folder:24s} k={c['k_point']:g}/{c['k_shift']:g}/{c['k_divergence']:g}"
            f" fast={c['fast'].seconds:g}s[{c['fast'].min_readings:g}-{c['fast'].max_readings:g}]"
            f" quiet={c['quiet'].seconds / 3600:g}h[{c['quiet'].min_readings:g}-"
            f"{c['quiet'].max_readings:g}]"
            for folder, c in chosen_s.items()
        ]
    if kind_name == "multiscale":
        combined, chosen_ms = multiscale_leave_one_folder_out(corpus, root, jobs)
        return combined, [
            f"  {folder:24s} fast={m.fast_readings:g} k={m.k_point:g}/{m.k_shift:g}/"
            f"{m.k_divergence:g} quiet={m.quiet_readings:g} readings"
            for folder, m in chosen_ms.items()
        ]
    combined, chosen = leave_one_folder_out(corpus, root, kind_name, jobs)
    return combined, [
        f"  {folder:24s} k={p.k}"
        + (f" half-life={p.half_life_days}d" if p.half_life_days is not None else "")
        + (f" quiet={p.quiet_days}d" if p.quiet_days is not None else "")
        for folder, p in chosen.items()
    ]


def _kind_outputs(args: tuple[str, Path | None, str]) -> tuple[str, dict[str, FloatArray]]:
    corpus_name, root, kind_name = args
    return kind_name, run_detector(load_named(corpus_name, root), kind_name, Params())


def run_all(
    corpus_name: str, root: Path | None, with_lofo: bool, results: Path | None, jobs: int
) -> int:
    """Every kind of KIND_TABLE at its defaults: NAB in-sample and (``with_lofo``)
    leave-one-folder-out beside the held-out corpus, or the one corpus asked for."""
    names = [corpus_name] if corpus_name != "nab" else ["nab", HELD_OUT_CORPUS]
    kinds = list(KIND_TABLE)
    started = time.perf_counter()
    scores: dict[str, dict[str, Scores]] = {}
    notes: list[str] = []
    for name in names:
        corpus_root = root if name == corpus_name else None
        corpus = load_named(name, corpus_root)
        scorer = NabScorer(corpus)
        out_dir = results if results is not None and name == corpus_name else RESULTS_ROOT / name
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            outputs = dict(pool.map(_kind_outputs, [(name, corpus_root, k) for k in kinds]))
        scores[name] = {}
        for kind_name in kinds:
            write_outputs(corpus, scorer, out_dir, kind_name, outputs[kind_name])
            scores[name][kind_name] = score_profiles(scorer, outputs[kind_name])
        notes.append(
            f"{name}: {len(corpus)} series, {sum(len(s) for s in corpus)} rows,"
            f" {corpus.window_count} windows; outputs in {out_dir}/<kind>/"
        )
    groups: list[str] = []
    columns: list[dict[str, Scores | None]] = []
    choices: list[str] = []
    for name in names:
        if name == "nab":
            groups.append("NAB in-sample")
            columns.append(dict(scores["nab"].items()))
            if with_lofo:
                nab = load_named("nab", root)
                nab_scorer = NabScorer(nab)
                held: dict[str, Scores | None] = {}
                for kind_name in kinds:
                    found = lofo(nab, root or CORPORA["nab"][1], kind_name, jobs)
                    held[kind_name] = (
                        None if found is None else score_profiles(nab_scorer, found[0])
                    )
                    if found is not None:
                        choices.append(f"{kind_name}:")
                        choices.extend(found[1])
                groups.append("NAB leave-one-folder-out")
                columns.append(held)
        else:
            groups.append(f"{name.upper()} (held out)")
            columns.append(dict(scores[name].items()))
    rows = [(describe(k, Params()), [c[k] for c in columns]) for k in kinds]
    print(format_columns(groups, rows))
    print()
    print("\n".join(notes))
    print(
        f"{time.perf_counter() - started:.0f} s;"
        f" alerts scored as flagged (threshold {FLAG_THRESHOLD})."
    )
    if choices:
        print("leave-one-folder-out choices per held-out NAB folder:")
        print("\n".join(choices))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evaluation", description=__doc__)
    parser.add_argument("--detector", default="adaptive", choices=sorted(KIND_DEFAULTS))
    parser.add_argument("--k", type=float, help="σ multiplier (kind's default if unset)")
    parser.add_argument("--direction", choices=("above", "below", "both"))
    parser.add_argument("--quiet-days", type=float, help="episode quiet period, event time")
    parser.add_argument("--half-life-days", type=float, help="adaptive baseline half-life")
    parser.add_argument(
        "--corpus",
        choices=sorted(CORPORA),
        default="nab",
        help=f"nab (default) or the held-out {HELD_OUT_CORPUS} (scored only, never tuned on)",
    )
    parser.add_argument(
        "--root", "--nab-root", dest="root", type=Path, help="the corpus' folder (shipped copy)"
    )
    parser.add_argument(
        "--results", type=Path, help="outputs folder (default bench/results/<corpus>)"
    )
    parser.add_argument("--lofo", action="store_true", help="add the leave-one-folder-out row")
    parser.add_argument(
        "--all",
        action="store_true",
        help="every kind at its defaults, one row each (on nab: beside the held-out corpus)",
    )
    parser.add_argument(
        "--feedback",
        action="store_true",
        help="the seasonal kind under the feedback protocol beside the plain replay"
        " (NAB only; with --lofo, leave-one-folder-out too)",
    )
    parser.add_argument(
        "--static-feedback",
        action="store_true",
        help="with --feedback: the static per-test scales (no fading, hours or caps) instead",
    )
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--score-only",
        metavar="NAME",
        help="score existing NAB-format outputs under --results/NAME (e.g. from the stream)",
    )
    args = parser.parse_args(argv)
    if args.lofo and args.corpus != "nab":
        parser.error(f"the {args.corpus} corpus is held out: no parameter may be chosen on it")
    if args.feedback:
        if args.detector != "seasonal" or args.corpus != "nab" or args.all or args.score_only:
            parser.error("--feedback replays the seasonal kind on NAB: --detector seasonal")
        return run_feedback(
            load_named("nab", args.root),
            args.root or CORPORA["nab"][1],
            args.jobs,
            args.lofo,
            static=args.static_feedback,
        )
    if args.all:
        return run_all(args.corpus, args.root, args.lofo, args.results, args.jobs)

    corpus = load_named(args.corpus, args.root)
    root = args.root or CORPORA[args.corpus][1]
    results_dir: Path = args.results or RESULTS_ROOT / corpus.name
    scorer = NabScorer(corpus)
    started = time.perf_counter()
    if args.score_only:
        name = args.score_only
        outputs = read_results_dir(results_dir, name, corpus)
        label = f"{name} (ours, from {results_dir / name})"
    else:
        params = Params(args.k, args.quiet_days, args.half_life_days, args.direction)
        outputs = run_detector(corpus, args.detector, params)
        name = args.detector
        label = describe(name, params)
    elapsed = time.perf_counter() - started

    results = score_profiles(scorer, outputs)
    if not args.score_only:
        write_outputs(corpus, scorer, results_dir, name, outputs)
    rows: list[tuple[str, Scores | float]] = [(label, results)]
    if corpus.name == "nab":
        rows.extend((f"{n} (published)", v) for n, v in SCOREBOARD)
    choices: list[str] = []
    if args.lofo:
        found = lofo(corpus, root, args.detector, args.jobs)
        if found is None:
            parser.error(f"{args.detector} has no grid to choose from (a fixed reference)")
        rows.append((f"{name} (ours) leave-one-folder-out", score_profiles(scorer, found[0])))
        choices = found[1]
    print(format_table(rows))
    print(
        f"\n{corpus.name}: {len(corpus)} files, {sum(len(s) for s in corpus)} rows replayed in"
        f" {elapsed:.1f} s; alerts scored as flagged (threshold {FLAG_THRESHOLD})."
    )
    if not args.score_only:
        print(f"NAB-format outputs: {results_dir / name}/<folder>/{name}_<file>.csv")
    if choices:
        print("leave-one-folder-out choices (k, half-life days, quiet days) per held-out folder:")
        print("\n".join(choices))
    return 0


if __name__ == "__main__":
    sys.exit(main())
