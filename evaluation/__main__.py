"""``python -m evaluation``: replay a detector kind over NAB offline, score it, print the table."""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from detector.kinds.multiscale import MultiscaleParams
from evaluation.corpus import DEFAULT_NAB_ROOT, Corpus, load_corpus
from evaluation.nab import PROFILES, CorpusScore, FloatArray, NabScorer
from evaluation.replay import (
    KIND_DEFAULTS,
    detector_kind,
    multiscale_alerts,
    multiscale_components,
    replay,
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
DEFAULT_RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results" / "nab"
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
    return {
        s.name: replay(kind, s.seconds.astype(np.float64), s.values).anomaly_scores for s in corpus
    }


def _grid_point(args: tuple[Path, str, Params]) -> tuple[Params, dict[str, FloatArray]]:
    root, kind_name, params = args
    return params, run_detector(load_corpus(root), kind_name, params)


def leave_one_folder_out(
    corpus: Corpus, root: Path, kind_name: str, jobs: int
) -> tuple[dict[str, FloatArray], dict[str, Params]]:
    """Outputs where each folder's files come from parameters chosen without that folder."""
    grid = [
        Params(k=k, half_life_days=h, quiet_days=q)
        for k, h, q in itertools.product(*LOFO_GRID.values())
    ]
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


def format_table(rows: Sequence[tuple[str, dict[str, CorpusScore] | float]]) -> str:
    header = f"{'detector':58s} {'standard':>9s} {'low FP':>9s} {'low FN':>9s}"
    lines = [header, "-" * len(header)]
    for label, value in sorted(rows, key=_standard, reverse=True):
        if isinstance(value, dict):
            cells = [f"{value[p].normalized:9.1f}" for p in PROFILES]
            lines.append(f"{label:58s} {' '.join(cells)}")
        else:
            lines.append(f"{label:58s} {value:9.1f} {'':>9s} {'':>9s}")
    return "\n".join(lines)


def _standard(row: tuple[str, dict[str, CorpusScore] | float]) -> float:
    value = row[1]
    return value["standard"].normalized if isinstance(value, dict) else value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evaluation", description=__doc__)
    parser.add_argument("--detector", default="adaptive", choices=sorted(KIND_DEFAULTS))
    parser.add_argument("--k", type=float, help="σ multiplier (kind's default if unset)")
    parser.add_argument("--direction", choices=("above", "below", "both"))
    parser.add_argument("--quiet-days", type=float, help="episode quiet period, event time")
    parser.add_argument("--half-life-days", type=float, help="adaptive baseline half-life")
    parser.add_argument("--nab-root", type=Path, default=DEFAULT_NAB_ROOT)
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    parser.add_argument("--lofo", action="store_true", help="add the leave-one-folder-out row")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--score-only",
        metavar="NAME",
        help="score existing NAB-format outputs under --results/NAME (e.g. from the stream)",
    )
    args = parser.parse_args(argv)

    corpus = load_corpus(args.nab_root)
    scorer = NabScorer(corpus)
    started = time.perf_counter()
    if args.score_only:
        name = args.score_only
        outputs = read_results_dir(args.results, name, corpus)
        label = f"{name} (ours, from {args.results / name})"
    else:
        params = Params(args.k, args.quiet_days, args.half_life_days, args.direction)
        outputs = run_detector(corpus, args.detector, params)
        name = args.detector
        d = KIND_DEFAULTS[name]
        shown: dict[str, object] = {
            "k": params.k or d.k,
            "dir": params.direction or d.direction,
        }
        if name == "multiscale":
            m = MultiscaleParams()
            shown = {
                "half-lives": f"{m.slow_readings:g}/{m.fast_readings:g}",
                "k": f"{m.k_point:g}/{m.k_shift:g}/{m.k_divergence:g}",
                "quiet": f"{m.quiet_readings:g}",
            }
        elif name != "static" and name != "refit-daily":
            shown["quiet"] = f"{params.quiet_days or d.quiet_days}d"
        if name == "adaptive":
            shown["half-life"] = f"{params.half_life_days or d.half_life_days}d"
        label = f"{name} (ours) " + " ".join(f"{k}={v}" for k, v in shown.items())
    elapsed = time.perf_counter() - started

    results = {p.name: scorer.score(outputs, p, FLAG_THRESHOLD) for p in PROFILES.values()}
    if not args.score_only:
        for series in corpus:
            extra = {}
            for profile in PROFILES.values():
                sweep = scorer.sweeps(profile)[list(corpus.series).index(series.name)]
                extra[f"S(t)_{profile.name}"] = sweep.weight
            write_results(
                results_path(args.results, name, series.name),
                series,
                outputs[series.name],
                extra,
            )
    rows: list[tuple[str, dict[str, CorpusScore] | float]] = [(label, results)]
    rows.extend((f"{n} (published)", v) for n, v in SCOREBOARD)
    chosen_ms: dict[str, MultiscaleParams] = {}
    chosen: dict[str, Params] = {}
    if args.lofo and args.detector == "multiscale":
        combined, chosen_ms = multiscale_leave_one_folder_out(corpus, args.nab_root, args.jobs)
    elif args.lofo:
        combined, chosen = leave_one_folder_out(corpus, args.nab_root, args.detector, args.jobs)
    if args.lofo:
        lofo = {p.name: scorer.score(combined, p, FLAG_THRESHOLD) for p in PROFILES.values()}
        rows.append((f"{name} (ours) leave-one-folder-out", lofo))
    print(format_table(rows))
    print(
        f"\n{len(corpus)} files, {sum(len(s) for s in corpus)} rows replayed in {elapsed:.1f} s;"
        f" alerts scored as flagged (threshold {FLAG_THRESHOLD})."
    )
    if not args.score_only:
        print(f"NAB-format outputs: {args.results / name}/<folder>/{name}_<file>.csv")
    if args.lofo:
        print("leave-one-folder-out choices (k, half-life days, quiet days) per held-out folder:")
        for folder, p in chosen.items():
            print(f"  {folder:24s} k={p.k} half-life={p.half_life_days}d quiet={p.quiet_days}d")
        for folder, m in chosen_ms.items():
            print(
                f"  {folder:24s} fast={m.fast_readings:g} k={m.k_point:g}/{m.k_shift:g}/"
                f"{m.k_divergence:g} quiet={m.quiet_readings:g} readings"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
