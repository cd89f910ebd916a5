"""Incidents on real servers: an outage injected across 200 series with two workers running is
one incident (one open event, one closed, one row in GET /incidents with 200 series); a single
series' episode is none; two outages far apart are two; GET /incidents pages and refuses bad
parameters with a 422."""

from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import redis

from detector.redis_keys import incident_key
from detector.settings import Settings
from ingest.subscriber import Subscriber
from tests.support.polling import wait_for
from tests.support.processes import start_worker, stop_process, wait_consuming
from tests.support.streams import fit, publish, stream_settings

WINDOW = 5  # seconds: event time for grouping, arrival time before a quiet incident closes
ON = {
    "INCIDENT_MIN_SERIES": "3",
    "INCIDENT_WINDOW_SECONDS": str(WINDOW),
    "INCIDENT_SWEEP_SECONDS": "0.2",
}
TRAINING = [90.0, 110.0] * 5  # μ 100, σ 10: 100 is never anomalous, 500 always is


@pytest.fixture
def s(settings: Settings) -> Settings:
    return stream_settings(settings, stream_batch_count=50)


def incident_events(client: redis.Redis, s: Settings) -> list[dict[str, str]]:
    return [
        f
        for _, f in client.xrange(s.stream_anomalies)  # type: ignore[union-attr]
        if f.get("type") == "incident"
    ]


def outage(series: list[str], start: int) -> list[tuple[str, int, float]]:
    """Each series: two normal readings, then one far above its model, within 3 seconds."""
    rows = [(sid, start + n, 100.0) for sid in series for n in range(2)]
    rows += [(sid, start + 2 + i % 2, 500.0) for i, sid in enumerate(series)]
    return rows


def base_time() -> int:
    """A time range of this test's own: GET /incidents lists every test's incidents."""
    return 1_000_000_000 + random.randrange(10**9) * 100


def listed(client: httpx.Client, since: int, until: int, **params: object) -> list[dict]:
    answer = client.get("/incidents", params={"since": since, "until": until, **params})
    assert answer.status_code == 200, answer.text
    return list(answer.json()["items"])


def worker_log() -> Path:
    return Path(tempfile.mkstemp(prefix="incidents-", suffix=".log")[1])


def test_an_outage_across_200_series_with_two_workers_is_one_incident(
    s: Settings, client: httpx.Client, redis_client: redis.Redis, series_id: str
) -> None:
    series = [f"{series_id}-{i}" for i in range(200)]
    for sid in series:
        fit(client, sid, TRAINING)
    start = base_time()
    log = worker_log()
    workers = [start_worker(s, f"w{n}", log, **ON) for n in (1, 2)]
    try:
        for n, proc in enumerate(workers, 1):
            wait_consuming(s, f"w{n}", proc)
        publish(redis_client, s.stream_readings, outage(series, start), batch=100)
        closed = wait_for(
            lambda: [e for e in incident_events(redis_client, s) if e["state"] == "closed"],
            "the incident to close",
            60,
        )
        time.sleep(1.0)  # more sweeps by both workers: still one of each
        events = incident_events(redis_client, s)
        assert [e["state"] for e in events] == ["open", "closed"], log.read_text()
        opened, (done,) = events[0], closed
        assert opened["incident_id"] == done["incident_id"]
        assert opened["source_id"] == opened["incident_id"]
        assert done["source_id"] == f"{opened['incident_id']}:closed"
        assert int(opened["series_count"]) >= 3
        assert int(done["series_count"]) == 200 and int(done["onset_count"]) == 200
        assert (int(done["first_onset"]), int(done["last_onset"])) == (start + 2, start + 3)
        assert done["closed_by"] == "idle"
        anomalies = [
            f for _, f in redis_client.xrange(s.stream_anomalies) if f.get("type") == "anomaly"
        ]
        assert len(anomalies) == 200 and all(f["onset"] == "1" for f in anomalies)

        # PostgreSQL has it once, with the 200 series, as GET /incidents shows.
        (row,) = wait_for(
            lambda: listed(client, start, start + 100, state="closed"), "the closed row", 30
        )
        assert row["incident_id"] == opened["incident_id"]
        assert row["source"] == s.stream_anomalies
        assert row["series_count"] == 200 and row["onset_count"] == 200
        assert (row["first_onset"], row["last_onset"]) == (start + 2, start + 3)
        assert row["closed_at"] >= row["opened_at"] and row["closed_by"] == "idle"
        assert listed(client, start, start + 100, state="open") == []
        # Nothing left for a worker to record, nothing open.
        assert redis_client.hlen(incident_key(s.stream_anomalies, "outbox")) == 0
        assert not redis_client.exists(incident_key(s.stream_anomalies, "current"))

        # Subscribers get incidents only when they ask.
        old = Subscriber(redis_client, stream=s.stream_anomalies, start="0", block_ms=100)
        assert {e["type"] for e in old.events(idle_timeout=0.5)} == {"anomaly"}
        both = Subscriber(
            redis_client,
            stream=s.stream_anomalies,
            start="0",
            block_ms=100,
            types=("anomaly", "incident"),
        )
        got = [e for e in both.events(idle_timeout=0.5) if e["type"] == "incident"]
        assert [e["state"] for e in got] == ["open", "closed"]
        assert got[1]["series_count"] == 200  # typed
    finally:
        for proc in workers:
            stop_process(proc)


def test_one_series_episode_is_no_incident_and_two_outages_far_apart_are_two(
    s: Settings, client: httpx.Client, redis_client: redis.Redis, series_id: str
) -> None:
    lone = f"{series_id}-lone"
    series = [f"{series_id}-{i}" for i in range(5)]
    for sid in (lone, *series):
        fit(client, sid, TRAINING)
    start = base_time()
    log = worker_log()
    proc = start_worker(s, "w1", log, **ON)

    def drained() -> bool:
        groups = redis_client.xinfo_groups(s.stream_readings)
        group = next(g for g in groups if g["name"] == s.stream_group)
        last = redis_client.xrevrange(s.stream_readings, count=1)
        return not group["pending"] and (not last or group["last-delivered-id"] == last[0][0])

    try:
        wait_consuming(s, "w1", proc)
        # One series' excursion, many anomalies, one episode: no incident.
        publish(redis_client, s.stream_readings, [(lone, start + i, 500.0) for i in range(20)])
        wait_for(drained, "the lone series", 30)
        # Two outages 10,000 s apart in event time, the second after the first was scored.
        publish(redis_client, s.stream_readings, outage(series, start + 1000))
        wait_for(lambda: incident_events(redis_client, s), "the first incident", 30)
        publish(redis_client, s.stream_readings, outage(series, start + 11_000))
        wait_for(lambda: len(incident_events(redis_client, s)) == 4, "both incidents closed", 60)
        events = incident_events(redis_client, s)
        assert [e["state"] for e in events] == ["open", "closed", "open", "closed"]
        first, second = events[1], events[3]
        assert first["closed_by"] == "window"  # the second outage's onsets came past it
        assert second["closed_by"] == "idle"
        for e, at in ((first, start + 1002), (second, start + 11_002)):
            assert int(e["series_count"]) == 5 and int(e["first_onset"]) == at
        rows = wait_for(
            lambda: (found := listed(client, start, start + 20_000)) and len(found) == 2 and found,
            "both rows",
            30,
        )
        # Newest first; the lone series is in neither.
        assert [r["first_onset"] for r in rows] == [start + 11_002, start + 1002]
        assert all(r["state"] == "closed" and r["series_count"] == 5 for r in rows)
        # Paged: one a page, the next URL carries the filters.
        bounds = {"since": start, "until": start + 20_000}
        page = client.get("/incidents", params={**bounds, "limit": 1})
        body = page.json()
        assert [r["first_onset"] for r in body["items"]] == [start + 11_002]
        rest = client.get(body["next"]).json()
        assert [r["first_onset"] for r in rest["items"]] == [start + 1002]
        assert rest["next"] is None
    finally:
        stop_process(proc)


def test_on_a_larger_fleet_an_incident_takes_a_share_of_it(
    s: Settings, client: httpx.Client, redis_client: redis.Redis, series_id: str
) -> None:
    """100 series seen on the stream and INCIDENT_MIN_SHARE 5 %: onsets of 4 series within
    the window are the fleet's background, not an incident (3 would be on a small fleet);
    onsets of 6 are one."""
    fleet = [f"{series_id}-{i}" for i in range(100)]
    for sid in fleet:
        fit(client, sid, TRAINING)
    start = base_time()
    log = worker_log()
    proc = start_worker(s, "w1", log, **ON, INCIDENT_MIN_SHARE="0.05")
    try:
        wait_consuming(s, "w1", proc)
        publish(redis_client, s.stream_readings, [(sid, start, 100.0) for sid in fleet])
        publish(redis_client, s.stream_readings, outage(fleet[:4], start + 1000))
        # The next outage, 10,000 s later, comes once the first was scored (its episodes
        # recorded), so the two never share a window.
        wait_for(
            lambda: (
                sum(f.get("type") == "anomaly" for _, f in redis_client.xrange(s.stream_anomalies))
                == 4
            ),
            "the 4 series' anomalies",
            30,
        )
        assert incident_events(redis_client, s) == []
        publish(redis_client, s.stream_readings, outage(fleet[10:16], start + 11_000))
        wait_for(lambda: len(incident_events(redis_client, s)) == 2, "the incident closed", 60)
        opened, closed = incident_events(redis_client, s)
        assert int(opened["min_series"]) == 5  # 5 % of the 100 watched series
        assert int(closed["series_count"]) == 6
    finally:
        stop_process(proc)


@pytest.mark.parametrize(
    "params",
    [
        {"limit": 0},
        {"limit": 1001},
        {"since": -1},
        {"until": "soon"},
        {"state": "pending"},
        {"before": "not-a-cursor"},
        {"before": "WzEsMl0"},  # base64 of [1,2]: not a page key
        {"source": "bad source"},
    ],
)
def test_bad_parameters_are_a_422(client: httpx.Client, params: dict[str, object]) -> None:
    answer = client.get("/incidents", params=params)
    assert answer.status_code == 422, answer.text
    assert "detail" in answer.json()
