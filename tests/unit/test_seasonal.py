"""The seasonal kind: one fold for one series or many, profiles, fallback, bounded state."""

from __future__ import annotations

import numpy as np
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from detector.kinds import seasonal as S
from detector.kinds.base import FitOptions, severity
from detector.kinds.training import prepare_training_data
from detector.state.series import SeriesState

STEP = 300.0


def daily_series(days: float, *, amplitude: float = 10.0, seed: int = 0, step: float = STEP):
    rng = np.random.default_rng(seed)
    ts = np.arange(int(days * S.DAY / step), dtype=np.float64) * step + 1_700_000_000.0
    phase = 2 * np.pi * (ts % S.DAY) / S.DAY
    return ts, 100.0 + amplitude * np.sin(phase) + rng.normal(0.0, 1.0, ts.size)


def fold_one_at_a_time(bank, rows, ts, xs):
    """The reference: every reading folded alone, in the given order."""
    outs = [S.fold(bank, rows[i : i + 1], ts[i : i + 1], xs[i : i + 1]) for i in range(len(rows))]
    return {name: np.concatenate([getattr(o, name) for o in outs]) for name in S.Folded.__slots__}


readings = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=3),  # series
        st.integers(min_value=-5, max_value=400),  # readings after the fit (late ones < 0)
        st.floats(min_value=-1e3, max_value=1e3, allow_nan=False),
    ),
    min_size=1,
    max_size=60,
)


@given(readings)
def test_folding_many_series_at_once_equals_folding_each_reading_alone(data) -> None:
    fits = [daily_series(3, seed=s) for s in range(4)]
    bank = np.stack([S.fit_state(ts, xs) for ts, xs in fits])
    end = max(ts[-1] for ts, _ in fits)
    rows = np.array([r for r, _, _ in data], dtype=np.intp)
    ts = np.array([end + i * STEP for _, i, _ in data])
    xs = np.array([x for _, _, x in data])
    reference = bank.copy()
    expected = fold_one_at_a_time(reference, rows, ts, xs)
    got = S.fold(bank, rows, ts, xs)
    np.testing.assert_array_equal(bank, reference)
    for name, values in expected.items():
        np.testing.assert_array_equal(getattr(got, name), values, err_msg=name)


def test_a_daily_peak_is_learned_and_raises_no_alert() -> None:
    """A nightly job: one hour a day, 20 above a level of 100 ± 1."""
    rng = np.random.default_rng(5)
    ts = np.arange(14 * 288, dtype=np.float64) * STEP + 1_700_000_000.0
    peak = S.hour_of_day(ts) == 2
    xs = 100.0 + 20.0 * peak + rng.normal(0.0, 1.0, ts.size)
    fit, rest = 7 * 288, slice(7 * 288, None)
    seasonal = S.replay([(ts, xs, fit)])[0]
    flat = S.replay([(ts, xs, fit)], S.SeasonalParams(season=False))[0]
    assert S.fit_state(ts[:fit], xs[:fit])[S.DAILY_ON] == 1.0
    assert int(seasonal.anomaly.sum()) == 0
    # The same recurring peak pages a baseline without a season, every night.
    assert int(flat.alert.sum()) >= 6
    # The expected value follows the daily curve.
    truth = 100.0 + 20.0 * peak[rest]
    assert np.max(np.abs(seasonal.expected - truth)) < 2.0


def test_a_series_without_a_season_falls_back_to_the_flat_baseline() -> None:
    rng = np.random.default_rng(1)
    ts = np.arange(4000, dtype=np.float64) * STEP
    xs = rng.normal(50.0, 2.0, ts.size)
    row = S.fit_state(ts[:3000], xs[:3000])
    assert row[S.DAILY_ON] == 0.0 and row[S.WEEKLY_ON] == 0.0
    plain = S.replay([(ts, xs, 3000)])[0]
    off = S.replay([(ts, xs, 3000)], S.SeasonalParams(season=False))[0]
    for name in S.Folded.__slots__:
        np.testing.assert_array_equal(getattr(plain, name), getattr(off, name))


def test_less_than_a_day_of_training_has_no_daily_profile() -> None:
    ts, xs = daily_series(0.9, amplitude=30.0)
    assert S.fit_state(ts, xs)[S.DAILY_ON] == 0.0


def test_a_weekly_profile_needs_a_week_and_is_found_in_one() -> None:
    rng = np.random.default_rng(2)
    ts = np.arange(int(21 * S.DAY / 3600), dtype=np.float64) * 3600.0
    weekend = S.day_of_week(ts) >= 5
    xs = np.where(weekend, 20.0, 100.0) + rng.normal(0.0, 1.0, ts.size)
    assert S.fit_state(ts[: 24 * 8], xs[: 24 * 8])[S.WEEKLY_ON] == 1.0
    assert S.fit_state(ts[: 24 * 6], xs[: 24 * 6])[S.WEEKLY_ON] == 0.0
    out = S.replay([(ts, xs, 24 * 8)])[0]
    assert int(out.alert.sum()) == 0


def test_a_level_shift_alerts_once_then_is_learned() -> None:
    rng = np.random.default_rng(3)
    ts = np.arange(6000, dtype=np.float64) * STEP
    xs = rng.normal(10.0, 1.0, ts.size)
    xs[3000:] += 15.0
    out = S.replay([(ts, xs, 2000)])[0]
    alerts = np.flatnonzero(out.alert) + 2000
    assert alerts.size >= 1 and 3000 <= alerts[0] < 3010
    assert not out.anomaly[-500:].any()


@pytest.mark.parametrize(
    ("step", "quiet"), [(1.0, 144.0), (60.0, 8_640.0), (300.0, 43_200.0), (3600.0, 43_200.0)]
)
def test_time_scales_fit_the_cadence(step: float, quiet: float) -> None:
    ts = np.arange(500, dtype=np.float64) * step
    xs = np.random.default_rng(4).normal(0.0, 1.0, ts.size)
    row = S.fit_state(ts, xs)
    assert row[S.STEP] == step
    assert row[S.QUIET] == quiet
    assert 3 * step <= row[S.FAST_HL] <= 6 * step < row[S.SLOW_HL] <= 2016 * step


def test_the_state_is_bounded_and_round_trips() -> None:
    ts, xs = daily_series(30)
    row = S.fit_state(ts, xs)
    assert S.STATE_BYTES <= 4096
    assert np.array_equal(S.decode_state(S.encode_state(row)), row)
    kind = S.SeasonalKind()
    fitted = kind.fit(prepare_training_data(ts, xs), FitOptions())
    stored = SeriesState("seasonal", 1, kind.initial_state(fitted.params))
    again = SeriesState.from_bytes(stored.to_bytes())
    assert np.array_equal(again.state, stored.state)
    assert len(stored.to_bytes()) < 8 * S.WIDTH + 128  # the row's bytes and a short header
    # A state stored before the row was kept as bytes (base64 in the JSON) still reads.
    legacy = orjson.dumps(
        {"kind": "seasonal", "version": 1, "count": 0, "episode_id": None, "ids": [],
         "recent": [], "state": S.encode_state(stored.state)}
    )  # fmt: skip
    assert np.array_equal(SeriesState.from_bytes(legacy).state, stored.state)
    with pytest.raises(ValueError, match="616 bytes"):
        S.decode_state(S.encode_state(row[:-1]))


def test_params_round_trip() -> None:
    p = S.SeasonalParams(quiet=S.TimeScale(600.0, 2.0, 20.0), k_point=6.0)
    assert S.SeasonalParams.from_dict(p.to_dict()) == p


def test_severity_is_fifty_at_the_threshold_and_bounded() -> None:
    assert severity(1.0) == 50.0
    assert severity(0.0) == 0.0
    assert 99.0 < float(severity(1e9)) <= 100.0


@given(st.floats(min_value=0.0, allow_nan=False))  # infinity included
def test_severity_is_in_0_100_and_grows_for_any_ratio(ratio: float) -> None:
    """An infinite ratio (|z| over a k of 5e-324) is 100, not NaN (which JSON writes as null,
    outside the documented 0–100)."""
    value = float(severity(ratio))
    assert 0.0 <= value <= 100.0
    assert value <= float(severity(ratio * 2.0)) and float(severity(np.inf)) == 100.0


def test_the_baseline_drawn_is_the_one_the_stream_starts_from() -> None:
    rng = np.random.default_rng(8)
    ts = np.arange(3 * 288, dtype=np.float64) * STEP + 1_700_000_000.0
    peak = S.hour_of_day(ts) == 2
    xs = 100.0 + 20.0 * peak + rng.normal(0.0, 1.0, ts.size)
    kind = S.SeasonalKind()
    params = kind.fit(prepare_training_data(ts, xs), FitOptions()).params
    expected, lower, upper = kind.baseline(params, ts)
    np.testing.assert_allclose(expected, 100.0 + 20.0 * peak, atol=1.0)
    assert np.all(lower < expected) and np.all(expected < upper)
    # The stream's first reading is judged against exactly these bounds.
    row = kind.initial_state(params)
    t = np.array([ts[-1] + STEP])
    got = S.fold(row[None, :].copy(), np.array([0]), t, np.array([100.0]))
    e, lo, hi = kind.baseline(params, t)
    assert (got.expected[0], got.lower[0], got.upper[0]) == (e[0], lo[0], hi[0])


def test_prepare_loads_the_fold_for_the_workers_argument_types():
    """``prepare`` (run in a thread when a worker starts) leaves the compiled fold ready for
    the first batch: numba loads machine code at a dispatcher's first call, so a prepare that
    only declared it would leave that load (about two seconds) to the first batch. Checked in
    a fresh interpreter, since this session's other tests may have folded already."""
    import subprocess
    import sys

    probe = (
        "from detector.kinds import seasonal as S\n"
        "S.SeasonalKind().prepare()\n"
        "print(len(S._compile().signatures))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=300
    )
    assert out.stdout.split()[-1] == "1"
