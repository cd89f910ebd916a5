"""The incident scripts against real Redis: the grouping rule (a Hypothesis property against
the plain Python rule in ``tests.support.incident_rule``), redelivery, the outbox and leases,
and closing a quiet incident."""

from __future__ import annotations

import asyncio
import uuid

import redis
from hypothesis import given
from hypothesis import strategies as st

from detector.settings import Settings
from detector.state.incidents import IncidentChanges, IncidentTracker, Onset
from detector.store.connections import redis_client
from tests.support.incident_rule import IncidentRule

WINDOW, NEED = 10, 3


def tracker(settings: Settings, output: str, **options: object) -> IncidentTracker:
    values = {"window_seconds": WINDOW, "min_series": NEED, **options}
    return IncidentTracker(redis_client(settings), output=output, **values)  # type: ignore[arg-type]


def summary(event: dict[str, str]) -> tuple[str, str, int, int, int, int, str | None]:
    return (
        event["state"],
        event["incident_id"],
        int(event["series_count"]),
        int(event["onset_count"]),
        int(event["first_onset"]),
        int(event["last_onset"]),
        event.get("closed_by"),
    )


# Batches of onsets from a few series; an episode id is unique per onset, and a batch may be
# delivered again (the worker died before committing it).
onset = st.tuples(st.sampled_from("abcdef"), st.integers(0, 60))
batches = st.lists(
    st.tuples(st.lists(onset, min_size=1, max_size=6), st.booleans()), min_size=1, max_size=12
)


@given(plan=batches)
def test_the_script_groups_onsets_as_the_rule_says(settings: Settings, plan) -> None:
    async def run() -> tuple[list[tuple], IncidentRule]:
        t = tracker(settings, f"rule-{uuid.uuid4().hex[:10]}")
        rule = IncidentRule(WINDOW, NEED)
        found: list[tuple] = []
        n = 0
        try:
            for batch, again in plan:
                onsets = []
                for series, ts in batch:
                    n += 1
                    onsets.append(Onset(series, ts, f"{n}-0"))
                for _ in range(2 if again else 1):
                    changes = await t.observe(onsets)
                    found += [summary(e) for e in changes.events]
                    for o in onsets:
                        rule.onset(o.series_id, o.timestamp, o.episode_id)
            return found, rule
        finally:
            await t.redis.aclose()

    found, rule = asyncio.run(run())
    assert found == rule.events
    opened = [e for e in found if e[0] == "open"]
    assert all(e[2] >= NEED for e in found)  # never fewer series than the rule's floor
    assert len({e[1] for e in opened}) == len(opened)  # a redelivery never opens one again


def test_an_outage_across_200_series_in_batches_is_one_incident(settings: Settings) -> None:
    async def run() -> tuple[list[dict[str, str]], IncidentChanges]:
        t = tracker(settings, f"rule-{uuid.uuid4().hex[:10]}", window_seconds=300)
        events: list[dict[str, str]] = []
        try:
            onsets = [Onset(f"s{i}", 1_700_000_000 + i % 5, f"{i}-0") for i in range(200)]
            for start in range(0, 200, 30):  # batches of 30, as several workers would see
                events += (await t.observe(onsets[start : start + 30])).events
            last = await t.observe(onsets[:30])  # a batch delivered again
            return events + last.events, last
        finally:
            await t.redis.aclose()

    (opened,), last = asyncio.run(run())
    assert opened["state"] == "open" and opened["incident_id"] == "incident:2-0"
    assert opened["series_count"] == "3"  # at the third series: the page goes out at once
    assert last.state is not None and last.active == 1  # the redelivery changed nothing
    assert last.state["series_count"] == "200" and last.state["onset_count"] == "200"
    assert (last.state["first_onset"], last.state["last_onset"]) == ("1700000000", "1700000004")


def test_one_series_alone_never_opens_an_incident(settings: Settings) -> None:
    async def run() -> IncidentChanges:
        t = tracker(settings, f"rule-{uuid.uuid4().hex[:10]}")
        try:
            return await t.observe([Onset("only", 100 + 60 * i, f"{i}-0") for i in range(50)])
        finally:
            await t.redis.aclose()

    changes = asyncio.run(run())
    assert changes.events == [] and changes.active == 0


def test_events_wait_in_the_outbox_until_delivered_and_a_lapsed_lease_is_handed_back(
    settings: Settings, redis_client: redis.Redis
) -> None:
    output = f"rule-{uuid.uuid4().hex[:10]}"

    async def run() -> tuple[IncidentChanges, IncidentChanges, IncidentChanges]:
        t = tracker(settings, output, mode="lease")
        try:
            first = await t.observe([Onset(s, 1000, f"{s}-0") for s in "abc"])
            # The worker "died" before producing: its lease runs out, a sweep takes it over.
            redis_client.zadd(t.keys[6], {first.events[0]["source_id"]: 0})
            again = await t.sweep()
            await t.delivered(again.events)
            after = await t.sweep()
            return first, again, after
        finally:
            await t.redis.aclose()

    first, again, after = asyncio.run(run())
    assert [e["state"] for e in first.events] == ["open"] and first.opened == 1
    assert again.events == first.events and again.active == 1
    assert after.events == []
    assert redis_client.xlen(output) == 0  # lease mode never writes to a stream


def test_a_quiet_incident_is_closed_by_the_sweep_once(
    settings: Settings, redis_client: redis.Redis
) -> None:
    output = f"rule-{uuid.uuid4().hex[:10]}"

    async def run() -> list[IncidentChanges]:
        a = tracker(settings, output, window_seconds=1)
        b = tracker(settings, output, window_seconds=1)
        try:
            steps = [await a.observe([Onset(s, 1000, f"{s}-0") for s in "abcd"])]
            await asyncio.sleep(1.2)  # more than the window of arrival time without an onset
            steps += [await a.sweep(), await b.sweep()]  # two workers sweeping
            return steps
        finally:
            await a.redis.aclose()
            await b.redis.aclose()

    opened, swept, other = asyncio.run(run())
    assert opened.opened == 1
    assert [summary(e) for e in swept.events] == [
        ("closed", "incident:c-0", 4, 4, 1000, 1000, "idle")
    ]
    assert other.events == [] and other.active == 0
    written = [f for _, f in redis_client.xrange(output)]
    assert [(f["state"], f["type"]) for f in written] == [
        ("open", "incident"),
        ("closed", "incident"),
    ]
    assert written[1]["source_id"] == "incident:c-0:closed"
