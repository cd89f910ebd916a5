"""Incidents without servers: the plain rule's properties (one incident per cluster of onsets,
never fewer series than the floor), merging states for PostgreSQL, the onsets of a batch,
the page cursor, and which subscribers get incident events."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from api.routes.incidents import cursor_of, parse_cursor
from detector.errors import InvalidInputError
from detector.state.incidents import onsets_of
from detector.store.incidents import merge_states
from detector.wire.events import ANOMALY, INCIDENT, wanted
from tests.support.incident_rule import IncidentRule


def test_an_outage_across_200_series_is_one_incident() -> None:
    rule = IncidentRule(window=300, need=3)
    for i in range(200):
        rule.onset(f"s{i}", 1_700_000_000 + i % 7, f"{i}-0")
    assert [e[0] for e in rule.events] == ["open"]
    assert rule.current is not None and len(rule.current.members) == 200


def test_one_series_is_never_an_incident_and_two_outages_apart_are_two() -> None:
    rule = IncidentRule(window=300, need=3)
    for i in range(100):
        rule.onset("only", 60 * i, f"{i}-0")
    assert rule.events == []
    for at in (100_000, 200_000):
        for s in "abcd":
            rule.onset(s, at, f"{s}{at}")
    assert [(e[0], e[2], e[-1]) for e in rule.events] == [
        ("open", 3, None),
        ("closed", 4, "window"),
        ("open", 3, None),
    ]


@given(
    st.lists(st.tuples(st.integers(0, 20), st.integers(0, 2000)), max_size=60),
    st.integers(2, 5),
)
def test_onsets_far_apart_never_share_an_incident(onsets, need) -> None:
    """In timestamp order, clusters separated by more than the window are separate
    incidents, and each incident has at least ``need`` series."""
    window = 50
    rule = IncidentRule(window, need)
    for n, (series, t) in enumerate(sorted(onsets, key=lambda o: o[1])):
        rule.onset(f"s{series}", t, f"{n}-0")
    for state, _, count, _, first, last, _ in rule.events:
        assert count >= need and last - first >= 0
    closed = [e for e in rule.events if e[0] == "closed"]
    opened = [e for e in rule.events if e[0] == "open"]
    assert len(opened) - len(closed) in (0, 1)
    spans = [(e[4], e[5]) for e in closed]
    for (_, last), (first, _) in itertools.pairwise(spans):
        assert first > last + window  # a gap wider than the window between incidents


def state(**fields: str) -> dict[str, str]:
    base = {
        "incident_id": "incident:1-0",
        "state": "open",
        "opened_at": "100.0",
        "series_count": "3",
        "onset_count": "3",
        "first_onset": "10",
        "last_onset": "12",
    }
    return base | fields


def test_merged_states_only_move_forward_in_any_order() -> None:
    closed = state(
        state="closed", closed_at="200.0", closed_by="idle", series_count="9", last_onset="20"
    )
    later = [state(series_count="5", first_onset="8"), closed, state(series_count="4")]
    for order in (later, later[::-1]):
        (row,) = merge_states(order)
        assert row["state"] == "closed" and row["closed_by"] == "idle"
        assert row["series_count"] == 9 and row["first_onset"] == 8 and row["last_onset"] == 20
        assert row["closed_at"].timestamp() == 200.0


def test_onsets_of_a_batch_are_its_events_with_onset_1_in_order() -> None:
    events = {
        "1-0": {"series_id": "a", "timestamp": "5", "onset": "1", "episode_id": "1-0"},
        "2-0": {"series_id": "a", "timestamp": "6", "onset": "0", "episode_id": "1-0"},
        "3-0": {"series_id": "b", "timestamp": "7", "onset": "1", "episode_id": "3-0"},
        "4-0": {"series_id": "c", "timestamp": "8"},  # no episodes (EPISODES=false)
    }
    assert [(o.series_id, o.timestamp, o.episode_id) for o in onsets_of(events)] == [
        ("a", 5, "1-0"),
        ("b", 7, "3-0"),
    ]


NAME = st.text("abcXYZ019_.:{}/-", min_size=1, max_size=40)


@given(st.integers(0, 2**62), NAME, NAME)
def test_a_cursor_round_trips(first: int, source: str, incident_id: str) -> None:
    assert parse_cursor(cursor_of(first, source, incident_id)) == (first, source, incident_id)


def test_a_cursor_that_is_not_one_is_refused() -> None:
    assert parse_cursor("9" * 19 + ",a,b")[0] == 2**62 + 1  # after every incident
    for bad in ("", "12", "12,a", "x,a,b", "1,a b,c", "1" * 20 + ",a,b", "1,a,b,c,"):
        try:
            parse_cursor(bad)
        except InvalidInputError:
            continue
        raise AssertionError(f"{bad!r} was taken for a cursor")


def test_incident_events_reach_only_subscribers_that_ask_and_follow_every_series() -> None:
    event = {"type": INCIDENT, "state": "open", "incident_id": "incident:1-0"}
    assert not wanted(event, frozenset({ANOMALY}), None)
    assert wanted(event, frozenset({ANOMALY, INCIDENT}), None)
    assert not wanted(event, frozenset({ANOMALY, INCIDENT}), "s1")  # names no series
