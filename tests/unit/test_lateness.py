"""The reorder buffer of stateful series: held, released in timestamp order, late, bounded."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from detector.kinds import seasonal as S
from detector.kinds.base import FitOptions
from detector.kinds.training import prepare_training_data
from detector.state.lateness import MAX_HELD, release
from detector.state.series import SeriesState, StreamReading, fold_states

STEP = 60
T0 = 1_700_000_000
TOLERANCE = 300  # five cadences


def initial() -> SeriesState:
    rng = np.random.default_rng(3)
    ts = T0 - STEP * np.arange(2000, 0, -1, dtype=np.float64)
    xs = 100.0 + rng.normal(0.0, 1.0, ts.size)
    kind = S.SeasonalKind()
    params = kind.fit(prepare_training_data(ts, xs), FitOptions()).params
    return SeriesState("seasonal", 1, kind.initial_state(params))


INITIAL = initial()


def reading(i: int, value: float, arrival: int | None = None) -> StreamReading:
    order = i if arrival is None else arrival
    return StreamReading(f"{1000 + order}-0", "s", T0 + STEP * i, value, 1, "seasonal")


def values(n: int, seed: int) -> list[float]:
    rng = np.random.default_rng(seed)
    xs = 100.0 + rng.normal(0.0, 1.0, n)
    xs[n // 3 : n // 3 + 4] += 30.0  # a spike (point alerts)
    xs[2 * n // 3 :] += 8.0  # a level shift (a shift alert, then learned)
    return [float(x) for x in xs]


def run(
    batches: list[list[StreamReading]], tolerance: int = TOLERANCE
) -> tuple[SeriesState, dict[str, dict[str, str]], list[dict[str, str]]]:
    """Fold the batches one after another; every event (source id → fields without
    ``detected_at``) and each batch's carriers."""
    state = copy.deepcopy(INITIAL)
    found: dict[str, dict[str, str]] = {}
    carriers = []
    for batch in batches:
        (result,) = fold_states(
            [state], [batch], acknowledged=None, detected_at=0.0, lateness=tolerance
        )
        state = result.state
        for sid, fields in result.events.items():
            assert sid not in found, "an event emitted twice"
            found[sid] = {k: v for k, v in fields.items() if k != "detected_at"}
        carriers.append(result.carriers)
    return state, found, carriers


def test_held_readings_wait_for_the_watermark_and_come_out_in_time_order() -> None:
    state = copy.deepcopy(INITIAL)
    a, b, c = reading(2, 1.0, 0), reading(0, 1.0, 1), reading(1, 1.0, 2)
    first = release(state, [a, b, c], TOLERANCE)
    assert first.ready == [] and first.late == [] and first.carrier == c
    assert state.newest == a.timestamp and [h[0] for h in state.held] == [b[0], c[0], a[0]]
    d = reading(7, 1.0, 3)  # the watermark passes 0, 1 and 2
    second = release(state, [d], TOLERANCE)
    assert [r.source_id for r in second.ready] == [b.source_id, c.source_id, a.source_id]
    assert [h[0] for h in state.held] == [d.source_id] and state.through == a.timestamp
    late = release(state, [reading(1, 1.0, 4)], TOLERANCE)  # behind a folded reading
    assert len(late.late) == 1 and late.carrier is None and late.ready == []


def test_the_buffer_is_capped_and_the_state_stays_small() -> None:
    state = copy.deepcopy(INITIAL)
    # Readings one second apart, tolerance an hour: all of them would wait.
    group = [StreamReading(f"{1000 + i}-0", "s", T0 + i, 100.0, 1, "seasonal") for i in range(200)]
    (result,) = fold_states([state], [group], acknowledged=None, detected_at=0.0, lateness=3600)
    assert len(result.state.held) == MAX_HELD
    assert result.state.count == 200 - MAX_HELD
    # The redelivery bookkeeping is bounded by the group's pending entries (emptied here):
    # the full buffer itself leaves the state well under 4 KB.
    result.state.ids, result.state.recent = result.state.ids[-20:], []
    assert len(result.state.to_bytes()) <= 3072
    again = SeriesState.from_bytes(result.state.to_bytes())
    assert again.held == result.state.held and again.newest == result.state.newest


def test_without_a_tolerance_the_state_is_written_as_before() -> None:
    (result,) = fold_states(
        [copy.deepcopy(INITIAL)], [[reading(0, 100.0)]], acknowledged=None, detected_at=0.0
    )
    assert b"held" not in result.state.to_bytes() and result.state.newest is None


@settings(max_examples=25, deadline=None)
@given(
    st.integers(0, 10**6),
    st.lists(st.integers(0, TOLERANCE), min_size=120, max_size=120),
    st.lists(st.integers(1, 40), min_size=1, max_size=10),
)
def test_readings_shuffled_within_the_tolerance_give_the_same_events_and_state(
    seed: int, delays: list[int], sizes: list[int]
) -> None:
    xs = values(120, seed)
    in_order = [reading(i, x) for i, x in enumerate(xs)]
    # Each reading delayed by up to the tolerance (arrival by timestamp + delay).
    arrival = sorted(range(120), key=lambda i: (T0 + STEP * i + delays[i], i))
    shuffled = [reading(i, xs[i], k) for k, i in enumerate(arrival)]
    ids = {r.timestamp: r.source_id for r in in_order}

    def batches(rows: list[StreamReading]) -> list[list[StreamReading]]:
        out, start, k = [], 0, 0
        while start < len(rows):
            size = sizes[k % len(sizes)]
            out.append(rows[start : start + size])
            start, k = start + size, k + 1
        return out

    want_state, want, _ = run(batches(in_order))
    got_state, got, _ = run(batches(shuffled))
    assert want, "the example has anomalies"

    def by_time(found: dict[str, dict[str, str]]) -> dict[str, dict[str, Any]]:
        # Ids differ (entry ids follow arrival): compare by timestamp, episodes by opener time.
        stamp = {sid: f["timestamp"] for sid, f in found.items()}
        stamp.update({s: str(t) for t, s in ids.items()})
        out = {}
        for fields in found.values():
            f = {k: v for k, v in fields.items() if k != "source_id"}
            f["episode_id"] = stamp.get(f["episode_id"], f["episode_id"])
            out[f["timestamp"]] = f
        return out

    shuffled_stamps = {r.source_id: str(r.timestamp) for r in shuffled}
    got_by_time = {}
    for fields in got.values():
        f = {k: v for k, v in fields.items() if k != "source_id"}
        f["episode_id"] = shuffled_stamps[f["episode_id"]]
        got_by_time[f["timestamp"]] = f
    assert got_by_time == by_time(want)
    assert np.array_equal(got_state.state, want_state.state)
    assert sorted(h[1] for h in got_state.held) == sorted(h[1] for h in want_state.held)
    assert not any("late" in f for f in got.values())


def test_a_late_reading_is_flagged_never_alerts_and_changes_nothing() -> None:
    xs = [100.0] * 30
    state, _, _ = run([[reading(i, x) for i, x in enumerate(xs)]])
    before = state.state.copy()
    late = reading(5, 160.0, 40)  # far behind the watermark, and anomalous
    (result,) = fold_states([state], [[late]], acknowledged=None, detected_at=0.0, lateness=300)
    fields = result.events[late.source_id]
    assert fields["late"] == "1" and fields["onset"] == "0" and result.opened == 0
    assert np.array_equal(result.state.state, before)
    # Redelivered: the same event again, nothing folded.
    (again,) = fold_states(
        [result.state], [[late]], acknowledged=None, detected_at=0.0, lateness=300
    )
    assert {k: v for k, v in again.events[late.source_id].items() if k != "detected_at"} == {
        k: v for k, v in fields.items() if k != "detected_at"
    }


def test_a_redelivered_carrier_writes_the_events_it_carried_again() -> None:
    spike = reading(0, 160.0)
    state, found, _ = run([[spike]])
    assert found == {}  # held: its event waits for the watermark
    carrier = reading(10, 100.0)
    (first,) = fold_states([state], [[carrier]], acknowledged=None, detected_at=0.0, lateness=300)
    assert first.carriers == {spike.source_id: carrier.source_id}
    assert first.events[spike.source_id]["onset"] == "1"
    # The batch's commit failed: the carrier comes again, folded onto the state written.
    (again,) = fold_states(
        [first.state], [[carrier]], acknowledged=None, detected_at=0.0, lateness=300
    )
    assert again.carriers == first.carriers
    assert again.events[spike.source_id] == first.events[spike.source_id]
    assert again.state.count == first.state.count
    # Once the carrier is committed for good, the outcome is forgotten.
    (done,) = fold_states(
        [again.state],
        [[]],
        acknowledged=lambda sid: sid <= carrier.source_id,
        detected_at=0.0,
        lateness=300,
    )
    assert done.state.recent == []


def test_a_flush_releases_every_held_reading_with_no_carrier() -> None:
    spike = reading(3, 160.0)
    state, found, _ = run([[reading(0, 100.0), reading(1, 100.0), reading(2, 100.0), spike]])
    assert found == {} and len(state.held) == 4  # all within 300 s of the newest
    (result,) = fold_states(
        [state], [[]], acknowledged=None, detected_at=0.0, lateness=300, flush=["s"]
    )
    assert result.state.held == [] and result.state.through == spike.timestamp
    assert result.carriers == {} and result.events[spike.source_id]["series_id"] == "s"
    assert result.state.count == 4
    late = release(result.state, [reading(2, 100.0, 9)], 300)  # behind what was flushed
    assert len(late.late) == 1
