"""The model's maths and training-data rules, with property tests."""

from __future__ import annotations

import statistics
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from detector.errors import InvalidTrainingDataError, TooLargeError
from detector.kinds.registry import model_from_dict
from detector.kinds.static import StaticModel, fit_static
from detector.kinds.training import prepare_training_data

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)
samples = st.lists(finite, min_size=3, max_size=200).filter(lambda xs: max(xs) - min(xs) > 1e-3)


def fit(values, **kw):
    data = prepare_training_data(list(range(len(values))), values)
    return fit_static(data, **kw)


@given(samples)
def test_mean_and_population_std_match_exact_arithmetic(values):
    model = fit(values)
    exact_mean = sum(Fraction(v) for v in values) / len(values)
    exact_var = sum((Fraction(v) - exact_mean) ** 2 for v in values) / len(values)
    assert model.mean == pytest.approx(float(exact_mean), rel=1e-9, abs=1e-6)
    assert model.std == pytest.approx(float(exact_var) ** 0.5, rel=1e-7, abs=1e-6)
    assert model.std == pytest.approx(statistics.pstdev(values), rel=1e-7, abs=1e-6)


@given(samples, st.floats(min_value=-1e9, max_value=1e9), st.floats(min_value=0.01, max_value=100))
def test_shift_and_scale_move_mean_and_std_as_they_should(values, shift, scale):
    base = fit(values)
    moved = fit([v * scale + shift for v in values])
    assert moved.std == pytest.approx(base.std * scale, rel=1e-6, abs=1e-6 * scale + 1e-6)
    assert moved.mean == pytest.approx(base.mean * scale + shift, rel=1e-9, abs=1e-3)


def test_large_offset_keeps_sigma():
    rng = np.random.default_rng(7)
    noise = rng.normal(0, 0.5, 10_000)
    model = fit(list(1e9 + noise))
    assert model.std == pytest.approx(float(np.std(noise)), rel=1e-6)


@given(samples, st.floats(min_value=0.1, max_value=10), st.sampled_from(["above", "below", "both"]))
def test_rule_is_strict_and_direction_aware(values, k, direction):
    model = fit(values, sigma=k, direction=direction)
    upper, lower = model.mean + k * model.std, model.mean - k * model.std
    probes = np.array(
        [
            upper,
            lower,
            upper + abs(upper) * 1e-9 + 1e-9,
            lower - abs(lower) * 1e-9 - 1e-9,
            model.mean,
        ]
    )
    flags = model.score(probes).anomaly
    # exactly on a bound is never anomalous (strict inequality)
    assert not flags[0] and not flags[1] and not flags[4]
    assert flags[2] == (direction in ("above", "both"))
    assert flags[3] == (direction in ("below", "both"))
    # the scalar path and the vectorised path agree
    assert [model.is_anomaly(float(p)) for p in probes] == flags.tolist()


@given(samples, st.lists(finite, min_size=1, max_size=50))
def test_score_is_signed_z(values, probes):
    model = fit(values)
    scores = model.score(np.array(probes))
    expected = [(p - model.mean) / model.std for p in probes]
    assert scores.score.tolist() == pytest.approx(expected)
    # Every reading is explained by the bounds and expected value in force for it.
    assert (scores.lower == model.mean - 3 * model.std).all()
    assert (scores.upper == model.mean + 3 * model.std).all()
    assert (scores.expected == model.mean).all()
    assert scores.test == ("threshold",)


@given(st.permutations(list(range(20))))
def test_order_does_not_matter_and_points_are_sorted(order):
    ts = [1000 + i for i in order]
    values = [float(i * i) for i in order]
    data = prepare_training_data(ts, values)
    assert data.timestamps.tolist() == sorted(ts)
    assert data.values.tolist() == [float(i * i) for i in range(20)]


def test_default_rule_is_value_above_mean_plus_three_sigma():
    model = fit([1.0, 2.0, 3.0, 4.0, 5.0])
    assert model.sigma == 3.0 and model.direction == "above"
    assert model.is_anomaly(model.mean + 3 * model.std + 1e-9)
    assert not model.is_anomaly(-1e9)


@pytest.mark.parametrize(
    ("timestamps", "values", "message"),
    [
        ([1, 2], [1.0, 2.0], "at least 3 points"),
        ([1, 2, 3], [1.0, 2.0], "same length"),
        ([1, 2, 3], [1.0, float("nan"), 2.0], "finite"),
        ([1, 2, 3], [1.0, float("inf"), 2.0], "finite"),
        ([1, 2, 2], [1.0, 2.0, 3.0], "unique"),
        ([1, 2, 3], [5.0, 5.0, 5.0], "constant"),
        ([1, 2.5, 3], [1.0, 2.0, 3.0], "non-negative integers"),
        ([1, -2, 3], [1.0, 2.0, 3.0], "non-negative integers"),
        ([1, 2, 2**70], [1.0, 2.0, 3.0], "non-negative integers"),
        ([1, 2, 3], [1e308, -1e308, 1e308], "too large"),
        # The bound the OpenAPI schema states (was accepted just past it).
        ([1, 2, 3], [1.0000000000000002e150, 0.0, 0.0], "within ±1e150"),
        ([1, 2, 3], [0.0, -1.0000000000000002e150, 0.0], "within ±1e150"),
    ],
)
def test_training_rules(timestamps, values, message):
    with pytest.raises(InvalidTrainingDataError, match=message):
        data = prepare_training_data(timestamps, values)
        fit_static(data)


def test_values_up_to_the_bound_fit():
    model = fit_static(prepare_training_data([1, 2, 3], [1e150, -1e150, 0.0]))
    assert np.isfinite(model.upper) and np.isfinite(model.lower)


def test_integral_float_timestamps_count_as_integers():
    data = prepare_training_data([3.0, 1.0, 2.0], [3.0, 1.0, 2.0])
    assert data.timestamps.dtype == np.int64
    assert data.timestamps.tolist() == [1, 2, 3]


def test_point_limits_are_configurable():
    with pytest.raises(TooLargeError):
        prepare_training_data([1, 2, 3, 4], [1.0, 2.0, 3.0, 4.0], max_points=3)
    with pytest.raises(InvalidTrainingDataError, match="at least 5"):
        prepare_training_data([1, 2, 3, 4], [1.0, 2.0, 3.0, 4.0], min_points=5)


@settings(max_examples=50)
@given(samples, st.floats(min_value=0.1, max_value=10), st.sampled_from(["above", "below", "both"]))
def test_stored_form_round_trips(values, k, direction):
    model = fit(values, sigma=k, direction=direction)
    assert model_from_dict(model.to_dict()) == model
    assert isinstance(model, StaticModel)
