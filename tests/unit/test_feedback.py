"""The feedback rule (``detector.feedback``) and its application to the seasonal state."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from detector.feedback import (
    DEFAULT_RULE,
    IDENTITY,
    TESTS,
    Adjustment,
    Feedback,
    FeedbackRule,
    adjustment,
)
from detector.kinds import seasonal as S
from detector.kinds.base import TESTS as KIND_TESTS
from evaluation.corpus import load_corpus
from evaluation.feedback import replay_file
from evaluation.replay import detector_kind, replay_all

items = st.builds(
    Feedback,
    st.sampled_from(["false_positive", "true_positive", "missed"]),
    st.sampled_from([None, "threshold", *TESTS]),
)
histories = st.lists(items, max_size=40)
rules = st.builds(
    FeedbackRule,
    widen=st.floats(1.0, 3.0),
    narrow=st.floats(0.1, 1.0),
    max_scale=st.floats(1.0, 10.0),
    min_scale=st.floats(0.1, 1.0),
)


def test_each_label() -> None:
    rule = DEFAULT_RULE
    assert adjustment([]) == IDENTITY
    assert adjustment([Feedback("true_positive", "point")]) == IDENTITY
    shifted = adjustment([Feedback("false_positive", "shift")])
    assert shifted == Adjustment(shift=rule.widen)  # only the test that fired
    assert adjustment([Feedback("false_positive", "threshold")]) == Adjustment(
        rule.widen, rule.widen, rule.widen
    )  # an unknown test: all three
    assert adjustment([Feedback("missed")]) == Adjustment(rule.narrow, rule.narrow, rule.narrow)
    with pytest.raises(ValueError, match="unknown feedback label"):
        adjustment([Feedback("nope")])  # type: ignore[arg-type]


def test_rule_refuses_nonsense() -> None:
    for bad in ({"widen": 0.5}, {"narrow": 1.5}, {"max_scale": 0.9}, {"min_scale": 0.0}):
        with pytest.raises(ValueError):
            FeedbackRule(**bad)


@given(histories, rules)
def test_bounded(history: list[Feedback], rule: FeedbackRule) -> None:
    for scale in adjustment(history, rule).scales():
        assert rule.min_scale <= scale <= rule.max_scale


@given(histories, st.integers(0, 40), items, rules)
def test_monotone(history: list[Feedback], at: int, extra: Feedback, rule: FeedbackRule) -> None:
    """A false positive added anywhere never narrows a test, a missed range never widens
    one, and a true positive changes nothing."""
    before = adjustment(history, rule).scales()
    after = adjustment([*history[:at], extra, *history[at:]], rule).scales()
    if extra.label == "false_positive":
        assert all(a >= b for a, b in zip(after, before, strict=True))
    elif extra.label == "missed":
        assert all(a <= b for a, b in zip(after, before, strict=True))
    else:
        assert after == before


@given(histories)
def test_round_trip(history: list[Feedback]) -> None:
    found = adjustment(history)
    assert Adjustment.from_dict(found.to_dict()) == found
    assert Adjustment.from_dict({}) == IDENTITY


def test_apply_adjustment_does_not_compound() -> None:
    ts = np.arange(2000, dtype=np.float64) * 300.0 + 1_700_000_000.0
    xs = np.random.default_rng(0).normal(100.0, 1.0, ts.size)
    row = S.fit_state(ts, xs)
    base = S.thresholds(row)
    for _ in range(3):
        S.apply_adjustment(row, base, (1.5, 1.25, 1.0))
    assert S.thresholds(row) == (base[0] * 1.5, base[1] * 1.25, base[2])
    S.apply_adjustment(row, base, IDENTITY.scales())
    assert S.thresholds(row) == base


def test_widened_threshold_lets_a_reading_pass() -> None:
    ts = np.arange(2000, dtype=np.float64) * 300.0 + 1_700_000_000.0
    xs = np.random.default_rng(1).normal(100.0, 1.0, ts.size)
    row = S.fit_state(ts, xs)
    spike = (np.array([ts[-1] + 300.0]), np.array([109.0]))  # ~9σ: beyond k_point 8
    plain = S.fold(row.reshape(1, -1).copy(), np.zeros(1, dtype=np.intp), *spike)
    assert plain.anomaly[0] and KIND_TESTS[int(plain.test[0])] == "point"
    wide = row.copy()
    scales = adjustment([Feedback("false_positive", "point")]).scales()
    S.apply_adjustment(wide, S.thresholds(row), scales)
    quiet = S.fold(wide.reshape(1, -1), np.zeros(1, dtype=np.intp), *spike)
    assert not quiet.anomaly[0]


def test_protocol_without_feedback_is_the_plain_replay() -> None:
    """The protocol's chunked fold, with no feedback, alerts exactly where the evaluation's
    seasonal replay does (two files, one of them with false positives)."""
    corpus = load_corpus()
    names = ["realKnownCause/nyc_taxi.csv", "artificialWithAnomaly/art_daily_jumpsup.csv"]
    kind = detector_kind("seasonal")
    for name in names:
        series = corpus.series[name]
        (expected,) = replay_all(kind, [(series.seconds.astype(np.float64), series.values)])
        run = replay_file(series, None, None)
        assert np.array_equal(run.alerts, expected.anomaly_scores)
        with_feedback = replay_file(series, None, DEFAULT_RULE)
        assert with_feedback.false_positives <= run.false_positives
