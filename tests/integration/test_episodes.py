"""Episodes: the quiet-period rule, late readings, redelivery, two workers, the history API."""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict

import httpx
import redis

from detector.settings import Settings
from detector.state.episodes import Assignment, EpisodeTracker
from detector.store.connections import redis_client as async_redis_client
from tests.support.streams import events, fit, publish, run_worker_async, sample, stream_settings

START = 1_700_000_000
QUIET = 600


def assign(
    settings: Settings, readings: list[tuple[str, int, str]], *, history: int = 8
) -> list[Assignment]:
    async def go() -> list[Assignment]:
        client = async_redis_client(settings)
        try:
            tracker = EpisodeTracker(client, quiet_seconds=QUIET, history=history)
            return await tracker.assign_readings(readings)
        finally:
            await client.aclose()

    return asyncio.run(go())


def fresh_series() -> str:
    return f"ep-{uuid.uuid4().hex[:10]}"


def test_quiet_period_closes_an_episode(settings: Settings) -> None:
    s = fresh_series()
    got = assign(
        settings,
        [
            (s, START, "1-0"),
            (s, START + QUIET, "2-0"),  # exactly the quiet period later: same episode
            (s, START + 2 * QUIET, "3-0"),  # within q of the last anomaly: still the same
            (s, START + 3 * QUIET + 1, "4-0"),  # more than q after the last: a new one
        ],
    )
    assert [(a.episode_id, a.onset, a.opened) for a in got] == [
        ("1-0", True, True),
        ("1-0", False, False),
        ("1-0", False, False),
        ("4-0", True, True),
    ]


def test_late_readings_join_the_episode_they_belong_to(settings: Settings) -> None:
    s = fresh_series()
    first = assign(settings, [(s, START + 1000, "10-0"), (s, START + 1100, "11-0")])
    assert [a.episode_id for a in first] == ["10-0", "10-0"]
    # Older than the episode's last anomaly, and even than its opener, but within q of it.
    late = assign(settings, [(s, START + 1050, "12-0"), (s, START + 1000 - QUIET, "13-0")])
    assert [(a.episode_id, a.onset) for a in late] == [("10-0", False), ("10-0", False)]
    # A new episode; then a straggler of the closed one still joins the closed one.
    later = assign(settings, [(s, START + 5000, "20-0"), (s, START + 1100 + QUIET, "14-0")])
    assert [(a.episode_id, a.onset) for a in later] == [("20-0", True), ("10-0", False)]
    # Far older than anything remembered: an episode of its own.
    stray = assign(settings, [(s, START - 10 * QUIET, "5-0")])
    assert [(a.episode_id, a.onset, a.opened) for a in stray] == [("5-0", True, True)]


def test_redelivery_gets_the_same_answer(settings: Settings) -> None:
    s, other = fresh_series(), fresh_series()
    batch = [
        (s, START, "1-0"),
        (other, START + 7, "1-1"),
        (s, START + 60, "2-0"),
        (s, START + 5000, "3-0"),
        (s, START + 30, "4-0"),
    ]
    first = assign(settings, batch)
    again = assign(settings, batch)  # the whole batch scored again after a crash
    assert [a.episode_id for a in first] == [a.episode_id for a in again]
    assert [a.onset for a in first] == [a.onset for a in again]
    assert [a.opened for a in first] == [True, True, False, True, False]
    assert not any(a.opened for a in again)  # counted once


def test_history_is_bounded(settings: Settings) -> None:
    s = fresh_series()
    readings = [(s, START + i * 10 * QUIET, f"{i + 1}-0") for i in range(20)]
    assign(settings, readings, history=3)
    # Only the three newest closed episodes are remembered: an old straggler is its own.
    late = assign(settings, [(s, START + 16 * 10 * QUIET + 5, "99-0")], history=3)
    assert late[0].episode_id == "17-0"
    stray = assign(settings, [(s, START + 5, "98-0")], history=3)
    assert (stray[0].episode_id, stray[0].onset) == ("98-0", True)


def test_two_workers_group_excursions_into_episodes(
    settings: Settings, client: httpx.Client, redis_client: redis.Redis
) -> None:
    s = stream_settings(
        settings, stream_batch_count=7, episode_quiet_seconds=QUIET, stream_record_postgres=True
    )
    series = [fresh_series() for _ in range(3)]
    for series_id in series:
        fit(client, series_id, [90.0, 110.0] * 5)  # bound 130
    excursions = [range(50, 55), [*range(100, 103), *range(107, 110)], range(200, 201)]
    anomalous = {i for block in excursions for i in block}
    rows = [
        (series_id, START + 60 * i, 200.0 if i in anomalous else 100.0)
        for i in range(300)
        for series_id in series
    ]
    publish(redis_client, s.stream_readings, rows)

    async def both() -> list[float]:
        done = await asyncio.gather(
            run_worker_async(s, consumer="a"), run_worker_async(s, consumer="b")
        )
        return [sample(m, "episodes_opened_total", source=s.stream_readings) for _, m in done]

    opened = asyncio.run(both())

    got = [f for _, f in events(redis_client, s.stream_anomalies)]
    assert len(got) == len(anomalous) * len(series)
    members: dict[str, set[int]] = defaultdict(set)
    onsets: dict[str, list[str]] = defaultdict(list)
    for f in got:
        members[f["episode_id"]].add((int(f["timestamp"]) - START) // 60)
        if f["onset"] == "1":
            onsets[f["episode_id"]].append(f["source_id"])
    expected = sorted(sorted(block) for block in excursions) * len(series)
    assert sorted(sorted(m) for m in members.values()) == sorted(expected)
    assert all(onsets[e] == [e] for e in members)  # one onset each: the opener
    assert sum(opened) == len(excursions) * len(series)

    answer = client.get("/anomalies", params={"series_id": series[0], "episodes": "true"})
    assert answer.status_code == 200, answer.text
    found = answer.json()["episodes"]
    assert [(e["first_timestamp"], e["last_timestamp"], e["count"]) for e in found] == [
        (START + 60 * 50, START + 60 * 54, 5),
        (START + 60 * 100, START + 60 * 109, 6),
        (START + 60 * 200, START + 60 * 200, 1),
    ]
    assert all(e["max_abs_score"] == 10.0 for e in found)  # (200 − 100) / 10
    plain = client.get("/anomalies", params={"series_id": series[0]}).json()["anomalies"]
    assert sum(1 for a in plain if a["onset"]) == 3


def test_episodes_off_keeps_the_plain_events(
    settings: Settings, client: httpx.Client, redis_client: redis.Redis
) -> None:
    s = stream_settings(settings, episodes=False)
    series_id = fresh_series()
    fit(client, series_id, [90.0, 110.0] * 5)
    publish(redis_client, s.stream_readings, [(series_id, START, 500.0)])
    asyncio.run(run_worker_async(s))
    (fields,) = [f for _, f in events(redis_client, s.stream_anomalies)]
    assert "episode_id" not in fields and "onset" not in fields
