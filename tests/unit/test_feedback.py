"""The feedback rule (``detector.feedback``) and its application to the seasonal state."""

from __future__ import annotations

import math

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from detector.feedback import (
    DEFAULT_RULE,
    IDENTITY,
    TESTS,
    VECTOR_LENGTH,
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


# Histories as the service records them: every judgment of a known test with its opener's
# level, every piece of feedback with an event time, given in event-time order.
DAY = 86_400.0
T0 = 1_700_000_000.0


@st.composite
def timed_histories(draw: st.DrawFn, max_size: int = 30) -> list[Feedback]:
    gaps = draw(st.lists(st.floats(0.0, 20 * DAY), max_size=max_size))
    out = []
    t = T0
    for gap in gaps:
        t += gap
        label = draw(st.sampled_from(["false_positive", "true_positive", "missed"]))
        if label == "missed":
            out.append(Feedback("missed", time=t))
        else:
            test = draw(st.sampled_from(TESTS))
            out.append(Feedback(label, test, time=t, level=draw(st.floats(0.8, 20.0))))
    return out


timed_rules = st.builds(
    FeedbackRule,
    widen=st.floats(1.0, 3.0),
    half_life=st.sampled_from([DAY, 7 * DAY, 30 * DAY, math.inf]),
    hour_widen=st.floats(1.0, 4.0),
    margin=st.floats(1.0, 2.0),
    narrow=st.floats(0.1, 1.0),
    max_scale=st.floats(1.0, 10.0),
    min_scale=st.floats(0.1, 1.0),
)
later = st.floats(0.0, 200 * DAY)


def in_force(found: Adjustment, t: float) -> list[float]:
    """Every test's multiple at ``t`` and each hour."""
    return [found.multiple(j, t, h) for j in range(len(TESTS)) for h in range(24)]


@given(timed_histories(), timed_rules, later)
def test_multiples_stay_within_bounds(
    history: list[Feedback], rule: FeedbackRule, wait: float
) -> None:
    found = adjustment(history, rule)
    end = history[-1].time if history else T0
    assert end is not None
    for m in in_force(found, end + wait):
        assert rule.min_scale * (1 - 1e-12) <= m <= rule.max_scale * (1 + 1e-12)


@given(timed_histories(), st.integers(0, 30), st.sampled_from(TESTS), st.floats(0.8, 20.0),
       st.booleans(), timed_rules, later)  # fmt: skip
def test_monotone_in_event_time(
    history: list[Feedback],
    at: int,
    test: str,
    level: float,
    missed: bool,
    rule: FeedbackRule,
    wait: float,
) -> None:
    """A false positive inserted anywhere in an event-time history never lowers a multiple,
    at any later time and hour; a missed range never raises one."""
    at = min(at, len(history))
    before_t = history[at - 1].time if at else T0
    assert before_t is not None
    extra = (
        Feedback("missed", time=before_t)
        if missed
        else Feedback("false_positive", test, time=before_t, level=level)
    )
    end = (history[-1].time if history else T0) or T0
    base = in_force(adjustment(history, rule), end + wait)
    more = in_force(adjustment([*history[:at], extra, *history[at:]], rule), end + wait)
    tol = 1e-9
    if missed:
        assert all(a <= b * (1 + tol) for a, b in zip(more, base, strict=True))
    else:
        assert all(a >= b * (1 - tol) for a, b in zip(more, base, strict=True))


def test_a_false_positive_fades_is_local_to_its_hour_and_capped_by_its_level() -> None:
    rule = DEFAULT_RULE
    at = T0 + 3 * 3600
    hour = int(at // 3600) % 24
    found = adjustment([Feedback("false_positive", "point", time=at, level=3.0)], rule)
    assert found.multiple(0, at) == pytest.approx(rule.widen)
    assert found.multiple(0, at, hour) == pytest.approx(rule.widen * rule.hour_widen)
    assert found.multiple(0, at, (hour + 1) % 24) == pytest.approx(rule.widen)
    assert found.multiple(1, at, hour) == 1.0  # the other tests keep their thresholds
    # A half-life later the widening's logarithm is halved; the hour's stays.
    assert found.multiple(0, at + rule.half_life) == pytest.approx(math.sqrt(rule.widen))
    assert found.multiple(0, at + 50 * rule.half_life) == pytest.approx(1.0)
    assert found.multiple(0, at + 50 * rule.half_life, hour) == pytest.approx(rule.hour_widen)
    # A marginal false alert caps the suppression just above itself.
    weak = adjustment([Feedback("false_positive", "point", time=at, level=1.05)], rule)
    assert weak.multiple(0, at, hour) == pytest.approx(rule.margin * 1.05)
    # Without a time or a level (feedback recorded before they were kept): static, uncapped.
    assert adjustment([Feedback("false_positive", "point")]) == Adjustment(point=rule.widen)


@given(timed_histories())
def test_timed_round_trip(history: list[Feedback]) -> None:
    found = adjustment(history)
    assert Adjustment.from_dict(found.to_dict()) == found
    assert Adjustment.from_dict(orjson.loads(orjson.dumps(found.to_dict()))) == found
    vector = found.vector()
    assert len(vector) in (0, VECTOR_LENGTH)
    assert (vector == ()) == found.identity


def fitted_row(seed: int = 2) -> np.ndarray:
    ts = np.arange(2000, dtype=np.float64) * 300.0 + T0
    xs = np.random.default_rng(seed).normal(100.0, 1.0, ts.size)
    return S.fit_state(ts, xs)


@settings(max_examples=40, deadline=None)
@given(timed_histories(max_size=12), st.lists(st.floats(0.0, 60 * DAY), min_size=1, max_size=20))
def test_the_fold_applies_what_the_rule_says(history: list[Feedback], waits: list[float]) -> None:
    """The worker's fold and the API's ``Adjustment.multiple`` agree on the point threshold
    in force, reading by reading (the band is the point test's threshold times σ)."""
    row = fitted_row()
    found = adjustment(history)
    start = (history[-1].time if history else T0) or T0
    ts = start - DAY + np.cumsum(np.array(waits))  # some readings before the latest feedback
    # Readings around the training mean, spread as it was: σ stays near 1, so the band's
    # half-width over σ keeps its digits (constant readings for weeks shrink σ to ~1e-9).
    xs = 100.0 + np.where(np.arange(ts.size) % 2, 1.0, -1.0)
    adjusted = S.with_adjustment(row, found.vector())
    folded = S.fold(adjusted.reshape(1, -1), np.zeros(ts.size, dtype=np.intp), ts, xs)
    k_point = (folded.upper - folded.expected) / folded.std
    hours = S.hour_of_day(ts)
    wanted = [row[S.K_POINT] * found.multiple(0, t, int(h)) for t, h in zip(ts, hours, strict=True)]
    assert np.allclose(k_point, wanted, rtol=1e-9)


def test_adjust_undoes_static_scales_and_keeps_a_carried_adjustment() -> None:
    row = fitted_row()
    kind = S.SeasonalKind()
    legacy = row.copy()
    S.apply_adjustment(legacy, S.thresholds(row), (1.5, 1.25, 1.0))  # as an older worker did
    assert np.array_equal(kind.adjust(legacy, (1.5, 1.25, 1.0), ()), row)
    vector = adjustment([Feedback("false_positive", "shift", time=T0, level=1.3)]).vector()
    wide = kind.adjust(row, (1.0, 1.0, 1.0), vector)
    assert wide.size == S.ADJUSTED_WIDTH and S.thresholds(wide) == S.thresholds(row)
    assert kind.adjust(wide, (1.0, 1.0, 1.0), vector) is wide  # nothing to do
    assert np.array_equal(kind.adjust(wide, (1.0, 1.0, 1.0), ()), row)
    assert np.array_equal(S.decode_state(S.encode_state(wide)), wide)
    # Three static scales (a hash an older API wrote) read as such.
    static = kind.adjust(row, (1.0, 1.0, 1.0), (1.25, 1.0, 1.0))
    carried = S.adjustment_of(static)
    assert np.array_equal(carried, Adjustment(point=1.25).vector(), equal_nan=True)


def test_series_with_and_without_feedback_fold_together_as_alone() -> None:
    kind = S.SeasonalKind()
    plain, other = fitted_row(3), fitted_row(4)
    wide = kind.adjust(other, (1.0, 1.0, 1.0), adjustment([Feedback("missed", time=T0)]).vector())
    ts = T0 + 600_000.0 + np.arange(50) * 300.0
    xs = np.random.default_rng(5).normal(100.0, 3.0, ts.size)
    together, folded = kind.fold(
        [plain.copy(), wide.copy()], np.repeat([0, 1], ts.size // 2), np.tile(ts[:25], 2), xs
    )
    alone = [kind.fold([r.copy()], np.zeros(25, dtype=np.intp), ts[:25], x)
             for r, x in ((plain, xs[:25]), (wide, xs[25:]))]  # fmt: skip
    assert together[0].size == S.WIDTH and together[1].size == S.ADJUSTED_WIDTH
    for state, (states, single) in zip(together, alone, strict=True):
        assert np.array_equal(state, states[0])
    assert np.array_equal(folded.ratio, np.concatenate([a[1].ratio for a in alone]))
    assert folded.level is not None
    assert np.array_equal(folded.level[:25], folded.ratio[:25])  # the version's thresholds
