"""Mergeable moments and the replayed detector kinds: properties against numpy, episodes."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from detector.kinds.moments import DecayingMoments, Moments
from evaluation.replay import DAY, Episodes, detector_kind, replay

values_st = st.lists(
    st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False),
    min_size=1,
    max_size=60,
)


def close(a: Moments, b: Moments, scale: float) -> None:
    assert a.weight == pytest.approx(b.weight, rel=1e-12)
    assert a.mean == pytest.approx(b.mean, rel=1e-9, abs=1e-9 * scale)
    assert a.m2 == pytest.approx(b.m2, rel=1e-7, abs=1e-7 * scale * scale * max(a.weight, 1))


@settings(max_examples=150, deadline=None)
@given(values_st, st.data())
def test_merging_two_halves_equals_the_whole(values: list[float], data: st.DataObject) -> None:
    cut = data.draw(st.integers(min_value=0, max_value=len(values)))
    merged = Moments.of(values[:cut]).merge(Moments.of(values[cut:]))
    close(merged, Moments.of(values), scale=max(map(abs, values)) + 1)


@settings(max_examples=150, deadline=None)
@given(values_st, st.randoms(use_true_random=False))
def test_order_and_batching_do_not_matter(values: list[float], rnd: object) -> None:
    shuffled = list(values)
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    one_by_one = Moments()
    for v in shuffled:
        one_by_one = one_by_one.update_batch([v])
    close(one_by_one, Moments.of(values), scale=max(map(abs, values)) + 1)


@settings(max_examples=150, deadline=None)
@given(values_st)
def test_matches_numpy_mean_and_population_variance(values: list[float]) -> None:
    m = Moments.of(values)
    scale = max(map(abs, values)) + 1
    assert m.weight == len(values)
    assert m.mean == pytest.approx(np.mean(values), rel=1e-9, abs=1e-9 * scale)
    assert m.variance == pytest.approx(np.var(values), rel=1e-7, abs=1e-9 * scale * scale)


def test_stable_for_large_offset_plus_small_noise() -> None:
    rng = np.random.default_rng(3)
    noise = rng.normal(0.0, 0.01, 10_000)
    values = 1e9 + noise
    state = Moments()
    for chunk in np.array_split(values, 37):  # uneven batches, as workers would merge them
        state = state.update_batch(chunk)
    assert state.std == pytest.approx(float(np.std(noise)), rel=1e-4)
    assert state.mean == pytest.approx(1e9 + float(np.mean(noise)), abs=1e-6)
    # The naive Σx² formula loses every digit here; ours must not.
    assert state.std > 0.009


def test_empty_state_is_neutral_and_has_no_variance() -> None:
    m = Moments.of([1.0, 2.0, 4.0])
    assert Moments().merge(m) == m and m.merge(Moments()) == m
    assert math.isnan(Moments().variance)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=30 * 86_400),
            st.floats(min_value=-1e3, max_value=1e3, allow_nan=False),
        ),
        min_size=2,
        max_size=40,
    ),
    st.randoms(use_true_random=False),
)
def test_decaying_state_is_order_independent_and_mergeable(
    readings: list[tuple[int, float]], rnd: object
) -> None:
    half_life = 3 * 86_400.0
    ts = np.array([t for t, _ in readings], dtype=np.float64)
    xs = np.array([x for _, x in readings])
    whole = DecayingMoments.of(ts, xs, half_life)
    shuffled = list(readings)
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    one_by_one = DecayingMoments(half_life)
    for t, x in shuffled:
        one_by_one = one_by_one.update_one(t, x)
    cut = len(readings) // 2
    halves = DecayingMoments.of(ts[:cut], xs[:cut], half_life).merge(
        DecayingMoments.of(ts[cut:], xs[cut:], half_life)
    )
    for state in (one_by_one, halves):
        assert state.time == whole.time
        close(state.moments, whole.moments, scale=1e3)
    # Weights are 2^(−age/half-life): checked against a direct weighted computation.
    w = np.exp2(-(ts.max() - ts) / half_life)
    assert whole.mean == pytest.approx(np.sum(w * xs) / np.sum(w), abs=1e-6)
    assert whole.weight == pytest.approx(np.sum(w))


def test_decay_halves_the_weight_per_half_life_and_forgets_after_a_long_gap() -> None:
    state = DecayingMoments.of([0.0, 0.0], [1.0, 3.0], half_life=10.0)
    later = state.decayed_to(10.0)
    assert later.weight == pytest.approx(1.0)
    assert (later.mean, later.std) == (pytest.approx(2.0), pytest.approx(1.0))
    assert state.decayed_to(1e6).weight == 0.0
    assert state.decayed_to(-5.0) == state  # never moves back


def test_adaptive_baseline_follows_a_level_shift() -> None:
    """After a step the static rule keeps firing; the adaptive kind alerts once, then adapts."""
    rng = np.random.default_rng(0)
    ts = np.arange(4000, dtype=np.float64) * 300.0
    values = rng.normal(10.0, 1.0, ts.size)
    values[2000:] += 20.0  # a lasting shift, not an outlier
    static = replay(detector_kind("static"), ts, values)
    adaptive = replay(detector_kind("adaptive", half_life_days=1.0), ts, values)
    assert static.alert[2000:].sum() > 1900
    assert adaptive.alert[2000] and adaptive.alert[:2000].sum() <= 3
    assert adaptive.alert[2000:].sum() <= 5
    assert not adaptive.anomaly[3500:].any()  # the shift is the new normal


def test_episodes_one_alert_per_excursion() -> None:
    episodes = Episodes(quiet=DAY)
    times = [0.0, 300.0, 600.0, 0.5 * DAY, 2 * DAY]
    assert [episodes.alert(t, True) for t in times] == [True, False, False, False, True]
    once = Episodes(quiet=DAY, extend=False)
    times = [0.0, 0.6 * DAY, 1.2 * DAY, 1.5 * DAY]
    assert [once.alert(t, True) for t in times] == [True, False, True, False]
    assert not Episodes().alert(0.0, False)


def test_probationary_rows_fit_the_model_and_raise_no_alert() -> None:
    ts = np.arange(1000, dtype=np.float64) * 300.0
    values = np.where(np.arange(1000) % 2 == 0, 1.0, 2.0)
    values[10] = 100.0  # in the 150-row probation: part of the fit, never an alert
    values[500] = 100.0
    out = replay(detector_kind("static-episodes"), ts, values)
    assert not out.alert[:150].any()
    assert np.flatnonzero(out.alert).tolist() == [500]
