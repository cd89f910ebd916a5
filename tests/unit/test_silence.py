"""The silent-series rules that need no server: the threshold, the fit's cadence, grouping."""

from __future__ import annotations

import pytest

from detector.fitting import fit_cadence
from detector.settings import Settings
from detector.state.silence import seen_series, silence_threshold
from detector.wire.events import ANOMALY, NO_DATA, wanted


@pytest.mark.parametrize(
    ("cadence", "cadences", "floor", "expected"),
    [
        (60.0, 10, 60, 600.0),  # a minutely series: ten minutes
        (1.0, 10, 60, 60.0),  # a 1 Hz sensor: the floor, not 10 s of a GC pause
        (3600.0, 10, 60, 36_000.0),
        (1.0, 2, 1, 2.0),
        (5.0, 0, 60, None),  # 0 cadences: the watch is off
        (0.0, 10, 60, None),  # no cadence known yet: not watched
    ],
)
def test_silence_threshold(cadence, cadences, floor, expected):
    assert silence_threshold(cadence, cadences, floor) == expected


def test_defaults_are_sane():
    s = Settings()
    assert silence_threshold(1.0, s.silence_cadences, s.silence_min_seconds) == 60.0
    assert silence_threshold(300.0, s.silence_cadences, s.silence_min_seconds) == 3000.0


def test_fit_cadence_is_the_median_positive_interval():
    assert fit_cadence([0, 60, 120, 180, 3600]) == 60.0  # a gap does not stretch it
    assert fit_cadence([180, 0, 60, 60, 120]) == 60.0  # unsorted, duplicates ignored
    assert fit_cadence([5, 5, 5]) is None


def test_seen_series_groups_a_batch_by_series_and_skips_readings_without_a_model():
    seen = seen_series(
        ["1-0", "2-0", "3-0", "4-0", "5-0"],
        ["a", "b", "a", "c", "a"],
        [10, 7, 12, 1, 11],
        [1, 2, 1, None, 3],
    )
    assert [(s.series_id, s.version, s.first_timestamp, s.low, s.high, s.count) for s in seen] == [
        ("a", 3, 10, 10, 12, 3),
        ("b", 2, 7, 7, 7, 1),
    ]
    assert seen[0].first_source_id == "1-0"


def test_old_subscribers_get_anomalies_only():
    only = frozenset({ANOMALY})
    assert wanted({"series_id": "a"}, only, None)  # written before types: an anomaly
    assert wanted({"series_id": "a", "type": ANOMALY}, only, "a")
    assert not wanted({"series_id": "a", "type": NO_DATA}, only, None)
    assert wanted({"series_id": "a", "type": NO_DATA}, frozenset({ANOMALY, NO_DATA}), "a")
    assert not wanted({"series_id": "a"}, only, "b")
