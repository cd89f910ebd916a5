"""The order a series' readings are folded in: by timestamp, ties by delivery order."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from detector.state.series import StreamReading, entry_order, fold_order

ids = st.one_of(
    st.tuples(st.integers(0, 10**13), st.integers(0, 5)).map(lambda p: f"{p[0]}-{p[1]}"),
    st.integers(0, 10**9).map(lambda offset: f"readings/3/{offset}"),
    st.integers(0, 10**9).map(lambda index: f"backfill/job/{index}"),
)
readings = st.lists(
    st.tuples(ids, st.integers(1_700_000_000, 1_700_000_050)), max_size=30, unique_by=lambda r: r[0]
).map(lambda rows: [StreamReading(sid, "s", ts, 1.0, 1, "seasonal") for sid, ts in rows])


@given(readings)
def test_fold_order_is_time_then_delivery_order(group: list[StreamReading]) -> None:
    expected = sorted(group, key=lambda r: (r.timestamp, entry_order(r.source_id)))
    assert list(fold_order(group)) == expected


@given(st.lists(st.integers(0, 10**6), unique=True, max_size=50))
def test_readings_in_increasing_time_are_taken_as_they_are(stamps: list[int]) -> None:
    group = [
        StreamReading(f"backfill/j/{i}", "s", ts, 0.0, 1, "seasonal")
        for i, ts in enumerate(sorted(stamps))
    ]
    assert fold_order(group) is group
