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


# Deliveries of a Redis group: per step, a batch of new entries and redeliveries of pending
# ones, then the group's oldest pending entry (the watermark) moves on, never back.
deliveries = st.lists(
    st.tuples(
        st.lists(st.tuples(st.integers(0, 2), st.floats(-50, 50)), min_size=1, max_size=8),
        st.integers(0, 3),  # how many of the pending entries are redelivered
        st.integers(0, 8),  # how many pending entries the watermark passes after the step
    ),
    min_size=1,
    max_size=12,
)


@given(deliveries)
def test_a_groups_watermark_gives_what_the_plain_predicate_gives(steps) -> None:
    """``Below`` lets ``fold_states`` forget a state's folded ids at once (their newest is
    below the watermark) and parse each fresh id once; the states, events and ids must be
    those of the same watermark given as a plain predicate, which checks every id. The
    watermark is the oldest pending entry, as Redis keeps it: a first delivery folded without
    one (ids kept without a bound) stays pending throughout and is redelivered last."""
    import copy

    import numpy as np

    from detector.kinds import seasonal as S
    from detector.state.series import Below, SeriesState, fold_states

    ts0 = np.arange(64, dtype=np.float64) * 60.0 + 1_700_000_000.0
    row = S.fit_state(ts0, 100.0 + np.sin(np.arange(64.0)))
    fast = [SeriesState("seasonal", 1, row.copy()) for _ in range(3)]
    plain = copy.deepcopy(fast)
    stamp = int(ts0[-1])
    first = [StreamReading(f"5000-{i}", str(i), stamp + 60, 1.0, 1, "") for i in range(3)]
    stamp += 60
    pending: list[StreamReading] = []
    watermark = (0, 0)

    def step(batch: list[StreamReading], watermark: tuple[int, int] | None) -> None:
        groups = [[r for r in batch if r.series_id == str(i)] for i in range(3)]
        found = []
        for states, acknowledged in (
            (fast, None if watermark is None else Below(watermark)),
            (plain, None if watermark is None else lambda s, w=watermark: entry_order(s) < w),
        ):
            results = fold_states(states, groups, acknowledged=acknowledged, detected_at=0.0)
            states[:] = [r.state for r in results]
            found.append([r.events for r in results])
        assert found[0] == found[1]

    step(first, None)
    for n, (news, again, passed) in enumerate(steps):
        batch = list(pending[:again])
        for k, (series, value) in enumerate(news):
            stamp += 60
            batch.append(StreamReading(f"{1000 + n}-{k}", str(series), stamp, value, 1, ""))
        pending += batch[again:]
        step(batch, watermark)
        pending = pending[passed:]
        oldest = min(entry_order(r.source_id) for r in [*pending, *first])
        watermark = max(watermark, oldest)
    step(first, watermark)  # still pending: recognised, not folded again
    for a, b in zip(fast, plain, strict=True):
        assert a.ids == b.ids and a.recent == b.recent and a.count == b.count
        assert np.array_equal(a.state, b.state, equal_nan=True)


@given(deliveries)
def test_first_deliveries_folded_as_fresh_give_what_the_checks_give(steps) -> None:
    """A Redis group's new entries (``>``) on their first attempt are folded with
    ``fresh=True``, skipping the per-reading redelivery checks; redeliveries come in batches
    of their own, checked. States, events, ids and id bounds must be those of the checked
    fold with the plain per-id predicate, and a redelivery after fresh batches must still be
    recognised (not folded again)."""
    import copy

    import numpy as np

    from detector.kinds import seasonal as S
    from detector.state.series import Below, SeriesState, fold_states

    ts0 = np.arange(64, dtype=np.float64) * 60.0 + 1_700_000_000.0
    row = S.fit_state(ts0, 100.0 + np.sin(np.arange(64.0)))
    fast = [SeriesState("seasonal", 1, row.copy()) for _ in range(3)]
    plain = copy.deepcopy(fast)
    stamp = int(ts0[-1])
    pending: list[StreamReading] = []
    watermark = (0, 0)

    def step(batch: list[StreamReading], fresh: bool) -> None:
        groups = [[r for r in batch if r.series_id == str(i)] for i in range(3)]
        found = []
        for states, acknowledged, as_fresh in (
            (fast, Below(watermark), fresh),
            (plain, lambda s, w=watermark: entry_order(s) < w, False),
        ):
            results = fold_states(
                states, groups, acknowledged=acknowledged, detected_at=0.0, fresh=as_fresh
            )
            states[:] = [r.state for r in results]
            found.append([r.events for r in results])
        assert found[0] == found[1]

    for n, (news, again, passed) in enumerate(steps):
        if again and pending:
            step(list(pending[:again]), False)  # redelivered: checked
        batch = []
        for k, (series, value) in enumerate(news):
            stamp += 60
            batch.append(StreamReading(f"{1000 + n}-{k}", str(series), stamp, value, 1, ""))
        pending += batch
        step(batch, True)
        pending = pending[passed:]
        if pending:
            watermark = max(watermark, min(entry_order(r.source_id) for r in pending))
        else:
            watermark = max(watermark, (1001 + n, 0))
    for a, b in zip(fast, plain, strict=True):
        assert a.ids == b.ids and a.recent == b.recent and a.count == b.count
        assert np.array_equal(a.state, b.state, equal_nan=True)
        # The fast bound, where kept, bounds the ids (the plain fold keeps none).
        if a.top is not None:
            assert a.top >= max(map(entry_order, a.ids))
    if pending:  # still pending: redelivered once more, recognised by both
        counts = [s.count for s in fast]
        step(list(pending), False)
        assert [s.count for s in fast] == counts
