"""NAB scoring: hand-computed cases, null/perfect normalisation, NAB's published numbers."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from evaluation.corpus import Corpus, Series, load_corpus, window_indices
from evaluation.nab import (
    PROFILES,
    NabScorer,
    perfect_scores,
    probationary_length,
    score_detections,
    sweep_file,
    threshold_curve,
)
from evaluation.results import read_results, read_results_dir, results_path, write_results

STANDARD = PROFILES["standard"]
DATA = Path(__file__).parent / "data"

# A 100-row file: probation 15 rows, one window on rows 40..49 (width 10).
N, WINDOW = 100, (40, 49)


def sig(x: float) -> float:
    """NAB's scaled sigmoid, written out independently of the implementation."""
    return 2.0 / (1.0 + math.exp(5.0 * x)) - 1.0


def score_rows(rows: list[int], profile_name: str = "standard") -> float:
    profile = PROFILES[profile_name]
    detected = np.zeros(N, dtype=bool)
    detected[rows] = True
    return score_detections(sweep_file(N, [WINDOW], profile), detected, profile).score


def make_series(name: str, n: int, windows: tuple[tuple[int, int], ...]) -> Series:
    start = np.datetime64("2024-01-01T00:00:00")
    return Series(
        name=name,
        timestamps=start + np.arange(n) * np.timedelta64(300, "s"),
        values=np.sin(np.arange(n, dtype=np.float64)),
        windows=windows,
    )


def test_probationary_length_is_15_percent_capped_at_750() -> None:
    assert probationary_length(100) == 15
    assert probationary_length(4032) == 604
    assert probationary_length(5000) == 750
    assert probationary_length(22695) == 750


def test_detection_at_window_start_earns_the_full_tp_weight() -> None:
    assert score_rows([40]) == pytest.approx(1.0)
    assert score_rows([40], "reward_low_FN_rate") == pytest.approx(1.0)


def test_detection_at_window_end_earns_little() -> None:
    # Last row: position −1/10.
    assert score_rows([49]) == pytest.approx(sig(-0.1) / sig(-1.0))
    assert 0.24 < score_rows([49]) < 0.26


def test_false_positive_far_from_any_window_costs_fp_weight() -> None:
    # Before the first window: −1 · fp; plus the missed window (−fn).
    assert score_rows([20]) == pytest.approx(-0.11 - 1.0)
    assert score_rows([20], "reward_low_FP_rate") == pytest.approx(-0.22 - 1.0)
    assert score_rows([20], "reward_low_FN_rate") == pytest.approx(-0.11 - 2.0)
    # More than three widths past the window: exactly −fp as well.
    assert score_rows([49 + 28]) == pytest.approx(-0.11 - 1.0)


def test_false_positive_right_after_a_window_costs_less() -> None:
    # One row past the end of a width-10 window: position 1/(10 − 1).
    expected = 0.11 * sig(1 / 9)
    assert score_rows([50]) == pytest.approx(-1.0 + expected)
    assert -0.04 < expected < -0.02


def test_only_the_first_detection_in_a_window_counts() -> None:
    first = sig(-(49 - 42 + 1) / 10) / sig(-1.0)
    assert score_rows([42, 45]) == pytest.approx(first)
    assert score_rows([42, 45, 48]) == pytest.approx(first)


def test_probationary_period_is_not_scored() -> None:
    assert score_rows([3, 10, 14]) == pytest.approx(-1.0)  # as if nothing was flagged
    assert score_rows([15]) == pytest.approx(-1.0 - 0.11)  # the first scored row


def test_counts_are_nab_row_counts() -> None:
    detected = np.zeros(N, dtype=bool)
    detected[[10, 20, 42, 45]] = True
    result = score_detections(sweep_file(N, [WINDOW], STANDARD), detected, STANDARD)
    assert (result.tp, result.fp, result.fn, result.tn) == (2, 1, 8, 74)
    assert result.total == N - 15


def test_one_row_window_is_rejected() -> None:
    with pytest.raises(ValueError, match="one-row"):
        sweep_file(N, [(40, 40)], STANDARD)


def test_small_corpus_null_zero_perfect_hundred_and_optimised_threshold() -> None:
    corpus = Corpus(
        {
            "a/one.csv": make_series("a/one.csv", 100, ((40, 49),)),
            "a/two.csv": make_series("a/two.csv", 200, ((50, 69), (120, 139))),
            "b/none.csv": make_series("b/none.csv", 80, ()),
        }
    )
    scorer = NabScorer(corpus)
    for profile in PROFILES.values():
        null = {s.name: np.zeros(len(s)) for s in corpus}
        perfect = {s.name: perfect_scores(s) for s in corpus}
        assert scorer.score(null, profile).normalized == pytest.approx(0.0)
        assert scorer.score(perfect, profile).normalized == pytest.approx(100.0)
    # Continuous scores: the optimiser keeps the threshold that drops the false positives.
    scores = {s.name: perfect_scores(s) * 0.9 for s in corpus}
    scores["b/none.csv"][60] = 0.5
    best = scorer.score(scores, STANDARD)
    assert best.threshold == pytest.approx(0.9)
    assert best.normalized == pytest.approx(100.0)
    assert scorer.score(scores, STANDARD, threshold=0.5).normalized < 100.0


def test_threshold_curve_matches_scoring_each_threshold() -> None:
    rng = np.random.default_rng(7)
    lengths, windows = [300, 500], [[(60, 89), (200, 239)], [(100, 149)]]
    sweeps = [sweep_file(n, w, STANDARD) for n, w in zip(lengths, windows, strict=True)]
    scores = [np.round(rng.random(n), 2) for n in lengths]  # rounding makes ties
    curve = threshold_curve(sweeps, scores, STANDARD)
    assert curve.thresholds[0] > 1.0 and np.all(np.diff(curve.thresholds) < 0)
    for threshold, total in zip(curve.thresholds, curve.totals, strict=True):
        direct = sum(
            score_detections(sw, sc >= threshold, STANDARD).score
            for sw, sc in zip(sweeps, scores, strict=True)
        )
        assert total == pytest.approx(direct)


def test_scores_outside_unit_interval_are_rejected() -> None:
    sweep = sweep_file(N, [WINDOW], STANDARD)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        threshold_curve([sweep], [np.full(N, 2.0)], STANDARD)


def test_bundled_corpus_null_and_perfect_in_every_profile() -> None:
    corpus = load_corpus()
    assert (len(corpus), corpus.window_count) == (58, 116)
    assert sum(len(s) for s in corpus) == 365_558
    scorer = NabScorer(corpus)
    assert scorer.null_score(STANDARD) == pytest.approx(-116.0)
    assert scorer.null_score(PROFILES["reward_low_FN_rate"]) == pytest.approx(-232.0)
    for profile in PROFILES.values():
        assert scorer.score({s.name: perfect_scores(s) for s in corpus}, profile).normalized == (
            pytest.approx(100.0)
        )
        assert scorer.score({s.name: np.zeros(len(s)) for s in corpus}, profile).normalized == (
            pytest.approx(0.0)
        )


@pytest.mark.parametrize(
    ("profile", "threshold", "expected"),
    [
        ("standard", 0.542187690735, 1.70586905384),
        ("reward_low_FP_rate", 0.575195503235, 1.37586905384),
        ("reward_low_FN_rate", 0.542187690735, 1.70586905384),
    ],
)
def test_reproduces_nab_published_per_file_scores(
    profile: str, threshold: float, expected: float
) -> None:
    """NAB's own results/numenta/numenta_<profile>_scores.csv for this file (ea702d7)."""
    name = "realKnownCause/ec2_request_latency_system_failure.csv"
    series = load_corpus().series[name]
    published = read_results(DATA / "numenta_ec2_request_latency_system_failure.csv")
    assert np.array_equal(published.timestamps, series.timestamps)
    sweep = sweep_file(len(series), series.windows, PROFILES[profile], name)
    result = score_detections(sweep, published.anomaly_scores >= threshold, PROFILES[profile])
    assert result.score == pytest.approx(expected, abs=1e-9)
    if profile == "standard":
        # NAB's Total_Count column counts the probationary rows too; these four do not.
        assert (result.tp, result.tn, result.fp, result.fn) == (7, 3079, 3, 339)


def test_windows_map_to_the_first_row_of_a_repeated_timestamp() -> None:
    stamps = np.array(
        ["2014-03-09 01:00", "2014-03-09 02:00", "2014-03-09 02:00", "2014-03-09 03:00"],
        dtype="datetime64[s]",
    )
    assert window_indices(stamps, [["2014-03-09 02:00:00.000000", "2014-03-09 03:00"]], "x") == (
        (1, 3),
    )
    with pytest.raises(ValueError, match="does not match"):
        window_indices(stamps, [["2014-03-09 02:30:00", "2014-03-09 03:00"]], "x")


def test_results_files_round_trip(tmp_path: Path) -> None:
    corpus = Corpus({"a/one.csv": make_series("a/one.csv", 100, ((40, 49),))})
    series = corpus.series["a/one.csv"]
    scores = np.linspace(0.0, 1.0, 100) ** 3  # values with long decimal expansions
    path = results_path(tmp_path, "mine", series.name)
    assert path == tmp_path / "mine" / "a" / "mine_one.csv"
    write_results(path, series, scores, extra={"S(t)_standard": np.full(100, -0.11)})
    assert path.read_text().splitlines()[0] == ("timestamp,value,anomaly_score,label,S(t)_standard")
    back = read_results(path)
    assert np.array_equal(back.timestamps, series.timestamps)
    assert np.array_equal(back.anomaly_scores, scores)
    assert np.array_equal(back.labels, series.labels())
    assert back.labels.sum() == 10
    assert np.array_equal(read_results_dir(tmp_path, "mine", corpus)["a/one.csv"], scores)
    path.write_text("\n".join(path.read_text().splitlines()[:-1]) + "\n")  # drop a row
    with pytest.raises(ValueError, match="do not match"):
        read_results_dir(tmp_path, "mine", corpus)
