"""The multiscale detector: JSON round-trips, merge properties, bounded state, stability."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from detector.kinds.multiscale import MultiscaleParams, MultiscaleState
from evaluation.replay import detector_kind, multiscale_alerts, multiscale_components, replay

STEP = 300.0
readings_st = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=3000),
        st.floats(min_value=-1e3, max_value=1e3, allow_nan=False),
    ),
    min_size=1,
    max_size=40,
)


def fitted(seed: int = 0, offset: float = 0.0) -> MultiscaleState:
    rng = np.random.default_rng(seed)
    ts = np.arange(200, dtype=np.float64) * STEP
    return MultiscaleState.fit(ts, offset + rng.normal(0.0, 1.0, ts.size))


def assert_same_model(a: MultiscaleState, b: MultiscaleState) -> None:
    assert a.time == b.time
    for x, y in ((a.slow, b.slow), (a.fast, b.fast)):
        assert x.weight == pytest.approx(y.weight, rel=1e-9, abs=1e-12)
        assert x.mean == pytest.approx(y.mean, rel=1e-9, abs=1e-6)
        assert x.m2 == pytest.approx(y.m2, rel=1e-6, abs=1e-3)
    np.testing.assert_allclose(a.slow_hist, b.slow_hist, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(a.fast_hist, b.fast_hist, rtol=1e-9, atol=1e-12)


@settings(max_examples=100, deadline=None)
@given(readings_st)
def test_state_round_trips_through_json(readings: list[tuple[int, float]]) -> None:
    state = fitted()
    for i, x in readings:
        state.update(200 * STEP + i * STEP, x)
    again = MultiscaleState.from_dict(json.loads(json.dumps(state.to_dict(), allow_nan=False)))
    assert again == state
    # A restored state carries on exactly as the original.
    assert again.update(1e7, 5.0) == state.update(1e7, 5.0)


@settings(max_examples=100, deadline=None)
@given(readings_st, st.randoms(use_true_random=False))
def test_model_state_is_order_independent_and_mergeable(
    readings: list[tuple[int, float]], rnd: object
) -> None:
    base = fitted()
    timed = [(200 * STEP + i * STEP, x) for i, x in readings]
    in_order = base.copy()
    for t, x in sorted(timed):
        in_order.observe(t, x)
    shuffled = list(timed)
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    any_order = base.copy()
    for t, x in shuffled:
        any_order.observe(t, x)
    assert_same_model(any_order, in_order)
    # Two workers fold halves into copies of an empty state of the same fit, then merge.
    empty = base.copy()
    empty.slow = empty.slow.scaled(0.0)
    empty.fast = empty.fast.scaled(0.0)
    empty.slow_hist = [0.0] * len(base.slow_hist)
    empty.fast_hist = [0.0] * len(base.fast_hist)
    left, right = empty.copy(), empty.copy()
    cut = len(shuffled) // 2
    for t, x in shuffled[:cut]:
        left.observe(t, x)
    for t, x in shuffled[cut:]:
        right.observe(t, x)
    assert_same_model(base.merge(left.merge(right)), in_order)
    assert_same_model(base.merge(right).merge(left), in_order)


@settings(max_examples=50, deadline=None)
@given(st.integers(min_value=1, max_value=5000), st.integers(min_value=1, max_value=30))
def test_state_size_is_bounded(n: int, bins: int) -> None:
    rng = np.random.default_rng(n)
    ts = np.arange(50, dtype=np.float64) * STEP
    state = MultiscaleState.fit(ts, rng.normal(size=50), MultiscaleParams(bins=bins))
    for i in range(n):
        state.update(50 * STEP + i * STEP, float(rng.normal() * 10))
    assert len(state.slow_hist) == len(state.fast_hist) == bins + 2
    size = len(json.dumps(state.to_dict()))
    assert size < 600 + 2 * 30 * (bins + 2)  # a few hundred bytes, whatever n is


def test_stable_for_large_offset_plus_small_noise() -> None:
    rng = np.random.default_rng(5)
    ts = np.arange(3000, dtype=np.float64) * STEP
    noise = rng.normal(0.0, 0.01, ts.size)
    state = MultiscaleState.fit(ts[:300], 1e9 + noise[:300])
    scores = [
        state.update(float(t), 1e9 + e)[0] for t, e in zip(ts[300:], noise[300:], strict=True)
    ]
    assert state.slow.std == pytest.approx(0.01, rel=0.1)
    assert state.slow.mean == pytest.approx(1e9, abs=1e-3)
    assert max(scores) < 1.0  # noise alone is never anomalous
    score, alert = state.update(float(ts[-1] + STEP), 1e9 + 1.0)  # 100 σ
    assert score > 1.0 and alert


def test_alerts_once_per_excursion_and_adapts_to_a_level_shift() -> None:
    rng = np.random.default_rng(1)
    ts = np.arange(6000, dtype=np.float64) * STEP
    values = rng.normal(10.0, 1.0, ts.size)
    values[3000:] += 20.0
    out = replay(detector_kind("multiscale"), ts, values)
    assert out.alert[3000] and out.alert[:3000].sum() <= 2
    assert out.alert[3000:].sum() <= 6  # one per quiet period while it adapts
    assert not out.anomaly[5000:].any()


def test_flat_series_change_is_anomalous() -> None:
    ts = np.arange(1000, dtype=np.float64) * STEP
    values = np.full(ts.size, 3.0)
    values[700] = 3.5
    # The state itself (a fit through the service refuses a constant training period).
    out = replay(detector_kind("multiscale", multiscale=MultiscaleParams()), ts, values)
    assert np.flatnonzero(out.alert).tolist() == [700]
    assert math.isfinite(float(out.z.max()))


def test_component_sweep_matches_the_streaming_replay() -> None:
    rng = np.random.default_rng(2)
    ts = np.arange(3000, dtype=np.float64) * STEP
    values = np.sin(ts / 86_400 * 2 * math.pi) + rng.normal(0, 0.2, ts.size)
    values[1500:1520] += 3.0
    values[2200:2400] = values[2200]
    params = MultiscaleParams()
    components, step = multiscale_components(params, ts, values)
    swept = multiscale_alerts(components, step, ts, params)
    streamed = replay(detector_kind("multiscale", multiscale=params), ts, values).alert
    assert swept.tolist() == streamed.tolist()
    assert streamed.any()


def test_merge_refuses_states_of_different_fits() -> None:
    with pytest.raises(ValueError):
        fitted(0).merge(fitted(0, offset=100.0))
