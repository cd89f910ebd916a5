"""The corpora (NAB and the held-out SKAB), NAB's window rule for labelled ranges, the
evaluation's kind table, the rolling-z reference, and the stream's default kind on NAB's
series without anomalies."""

from __future__ import annotations

import math

import numpy as np
import pytest

from detector.kinds.registry import KINDS
from detector.settings import Settings
from evaluation.__main__ import leave_one_folder_out, main
from evaluation.corpus import (
    DEFAULT_SKAB_ROOT,
    labelled_ranges,
    load_corpus,
    load_named,
    load_skab,
    nab_windows,
)
from evaluation.nab import PROFILES, NabScorer, perfect_scores, probationary_length
from evaluation.replay import (
    KIND_TABLE,
    QuietReadings,
    RollingBaseline,
    detector_kind,
    replay,
    stream_kind,
    stream_rows,
)

STEP = 300.0


def test_point_labels_get_nabs_centred_windows() -> None:
    # 10 % of 1000 rows shared by two labels: 50 rows each, centred on the label.
    assert nab_windows(1000, [(100, 100), (600, 600)]) == ((76, 125), (576, 625))


def test_short_ranges_widen_to_nab_width_and_long_ones_keep_their_extent() -> None:
    assert nab_windows(1000, [(300, 309)]) == ((255, 354),)  # 10 rows → 100, same centre
    assert nab_windows(1000, [(300, 699)]) == ((300, 699),)  # 400 rows ≥ 100: as labelled


def test_windows_are_clipped_and_merged() -> None:
    assert nab_windows(1000, [(0, 3)]) == ((0, 51),)
    assert nab_windows(1000, [(990, 999)]) == ((945, 999),)
    # Two labels whose widened windows overlap become one window.
    assert nab_windows(1000, [(100, 100), (120, 120)]) == ((76, 145),)
    assert nab_windows(100, []) == ()
    with pytest.raises(ValueError, match="outside"):
        nab_windows(100, [(90, 100)])


def test_labelled_ranges_are_the_runs_of_ones() -> None:
    flags = np.array([0, 1, 1, 0, 0, 1, 0, 1], dtype=np.float64)
    assert labelled_ranges(flags) == [(1, 2), (5, 5), (7, 7)]
    assert labelled_ranges(np.zeros(4)) == []


def test_skab_every_sensor_of_every_experiment_is_a_series() -> None:
    corpus = load_skab()
    assert corpus.name == "skab" and corpus.held_out
    assert len(corpus) == 35 * 8  # 34 labelled experiments + the anomaly-free run
    assert corpus.window_count == 34 * 8  # one labelled range per experiment
    assert corpus.folders == ["anomaly-free", "other", "valve1", "valve2"]
    pressure = corpus.series["valve1/0-Pressure.csv"]
    assert len(pressure) == 1147
    assert pressure.windows == ((573, 973),)  # the file's run of anomaly = 1, 401 rows
    assert pressure.values[0] == pytest.approx(0.054711)  # the file's first Pressure reading
    free = [s for s in corpus if s.folder == "anomaly-free"]
    assert len(free) == 8 and all(s.windows == () for s in free)
    # Scored as NAB is: other/2's anomaly starts at row 104, inside its probationary period
    # (117 rows), so a detection at each window's start misses those 8 windows (as NAB
    # counts them) and scores 100 · (1 − 8/272).
    late = [s for s in corpus if s.windows and s.windows[0][0] < probationary_length(len(s))]
    assert sorted({s.stem.split("-")[0] for s in late}) == ["2"] and len(late) == 8
    scorer = NabScorer(corpus)
    perfect = {s.name: perfect_scores(s) for s in corpus}
    assert scorer.score(perfect, PROFILES["standard"]).normalized == pytest.approx(
        100.0 * (1 - 8 / 272)
    )


def test_the_held_out_corpus_never_chooses_a_parameter() -> None:
    corpus = load_named("skab")
    with pytest.raises(ValueError, match="held out"):
        corpus.require_tunable()
    with pytest.raises(ValueError, match="held out"):
        leave_one_folder_out(corpus, DEFAULT_SKAB_ROOT, "static-episodes", jobs=1)
    with pytest.raises(SystemExit):
        main(["--corpus", "skab", "--lofo", "--detector", "static-episodes"])
    load_corpus().require_tunable()  # NAB is where settings are chosen


def test_every_registered_kind_has_an_entry_in_the_kind_table() -> None:
    missing = sorted(set(KINDS) - set(KIND_TABLE))
    assert missing == [], f"add one entry per kind to evaluation.replay.KIND_TABLE: {missing}"
    assert KIND_TABLE["rolling-z"].reference


def test_rolling_baseline_matches_numpy_over_a_sliding_window() -> None:
    rng = np.random.default_rng(3)
    values = 1e6 + rng.normal(0.0, 5.0, 2000)
    baseline = RollingBaseline(window=50)
    baseline.fit(np.arange(100, dtype=np.float64) * STEP, values[:100])
    for i in range(100, values.size):
        window = values[i - 50 : i]
        expected = (values[i] - window.mean()) / window.std()
        assert baseline.observe(i * STEP, float(values[i])) == pytest.approx(expected, rel=1e-6)


def test_quiet_readings_allow_one_alert_per_period() -> None:
    quiet = QuietReadings(readings=3)
    alerts = [quiet.alert(0.0, True) for _ in range(7)]
    assert alerts == [True, False, False, True, False, False, True]


def test_rolling_z_reference_alerts_once_per_288_readings() -> None:
    rng = np.random.default_rng(4)
    ts = np.arange(4000, dtype=np.float64) * STEP
    values = rng.normal(10.0, 1.0, ts.size)
    values[2000:2100] += 50.0  # a 100-reading excursion: one alert at its onset
    out = replay(detector_kind("rolling-z"), ts, values)
    assert out.alert[2000]
    assert not out.alert[2001:2288].any()
    assert math.isfinite(float(np.max(np.abs(out.z))))


def test_registry_replay_drops_repeated_timestamps_like_the_stream() -> None:
    ts = np.array([0.0, 300.0, 300.0, 600.0])
    assert stream_rows(ts).tolist() == [True, True, False, True]


def test_default_stream_kind_raises_no_alert_on_nabs_series_without_anomalies() -> None:
    """Every artificialNoAnomaly file replayed through the kind a fit gets by default, with
    the stream's default alert grouping: no alert after the probationary period."""
    settings = Settings()
    kind = stream_kind(settings)
    assert kind.name == settings.default_kind
    corpus = load_corpus()
    files = [s for s in corpus if s.folder == "artificialNoAnomaly"]
    assert len(files) == 5
    alerts: dict[str, list[int]] = {}
    for series in files:
        out = replay(kind, series.seconds.astype(np.float64), series.values)
        rows = np.flatnonzero(out.alert[probationary_length(len(series)) :])
        if rows.size:
            alerts[series.stem] = rows.tolist()[:5]
    assert alerts == {}, f"default kind {kind.name!r} alerts on series without anomalies"
    # The check bites: the same replay with a 1σ rule alerts on the noisy file.
    noisy = corpus.series["artificialNoAnomaly/art_noisy.csv"]
    loose = replay(
        stream_kind(Settings(default_kind="static", default_sigma=1.0, default_direction="both")),
        noisy.seconds.astype(np.float64),
        noisy.values,
    )
    assert loose.alert[probationary_length(len(noisy)) :].any()
