"""Sharded streams (STREAM_SHARDS) on one real Redis, through real worker processes: each
series stays on its shard, every reading is scored once, the events are those of one stream,
a worker killed mid-stream leaves its shards' entries to the other, stateful states live in
their shard's slot, and an outage across shards is one incident."""

from __future__ import annotations

import signal
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
import redis

from detector.redis_keys import incident_key, state_key
from detector.settings import Settings
from detector.shards import series_shard, shard_of, shard_tag, shards
from ingest.publisher import Publisher
from tests.support.polling import wait_for
from tests.support.processes import start_worker, stop_process, wait_consuming
from tests.support.streams import (
    fit,
    fit_seasonal,
    shard_events,
    shards_drained,
    stream_settings,
)

SHARDS = 4
TRAINING = [90.0, 110.0] * 5  # μ 100, σ 10: 100 is never anomalous, 500 always is


@pytest.fixture
def s(settings: Settings) -> Settings:
    return stream_settings(
        settings, stream_shards=SHARDS, stream_batch_count=50, stream_claim_idle_ms=1000
    )


def worker_log() -> Path:
    return Path(tempfile.mkstemp(prefix="shards-", suffix=".log")[1])


def test_series_stay_on_their_shard_and_every_reading_is_scored_once_with_a_worker_killed(
    s: Settings, client: httpx.Client, redis_client: redis.Redis, series_id: str
) -> None:
    series = [f"{series_id}-{i}" for i in range(24)]
    for sid in series:
        fit(client, sid, TRAINING)
    assert len({shard_of(sid, SHARDS) for sid in series}) == SHARDS  # all shards in use
    # 150 readings a series, every 10th far above its model: 360 anomalies in 3,600 readings.
    rows = [(sid, t, 500.0 if t % 10 == 9 else 100.0) for t in range(150) for sid in series]
    log = worker_log()
    procs = [start_worker(s, name, log) for name in ("w1", "w2")]
    try:
        for name, proc in zip(("w1", "w2"), procs, strict=True):
            wait_consuming(s, name, proc)
        with Publisher(redis_client, stream=s.stream_readings, shards=SHARDS) as pub:
            for n, (sid, t, v) in enumerate(rows):
                pub.publish(sid, t, v)
                if n == len(rows) // 3:
                    pub.flush()
                    time.sleep(0.3)  # both workers have batches in hand
                    procs[0].send_signal(signal.SIGKILL)  # no shutdown, no final commit
        assert pub.sent == len(rows)
        procs[0].wait(10)
        wait_for(lambda: shards_drained(redis_client, s), "every shard drained", 90)
    finally:
        for proc in procs:
            stop_process(proc)

    # Every anomaly once, in its series' shard's stream, none twice though a worker died.
    by_shard = shard_events(redis_client, s)
    found = Counter(
        (f["series_id"], int(f["timestamp"])) for events in by_shard.values() for f in events
    )
    assert found == Counter((sid, t) for sid, t, v in rows if v == 500.0), log.read_text()
    for index, events in by_shard.items():
        assert all(shard_of(f["series_id"], SHARDS) == index for f in events)
    # Nothing went to the unsharded names.
    assert not redis_client.exists(s.stream_readings, s.stream_anomalies)


def test_stateful_states_live_in_their_shards_slot(
    s: Settings, client: httpx.Client, redis_client: redis.Redis, series_id: str
) -> None:
    sid = f"{series_id}-seasonal"
    later = fit_seasonal(client, sid)
    log = worker_log()
    proc = start_worker(s, "w1", log)
    try:
        wait_consuming(s, "w1", proc)
        with Publisher(redis_client, stream=s.stream_readings, shards=SHARDS) as pub:
            for t, v in later:
                pub.publish(sid, t, v)
        wait_for(lambda: shards_drained(redis_client, s), "the shard drained", 60)
    finally:
        stop_process(proc)
    home = series_shard(s, sid)
    key = state_key(sid, home.namespace)
    assert key.startswith(shard_tag(home.index, SHARDS) + ":")  # the shard's hash tag first
    assert redis_client.exists(key), log.read_text()
    assert not redis_client.exists(state_key(sid))


def test_an_outage_across_every_shard_is_one_incident(
    s: Settings, client: httpx.Client, redis_client: redis.Redis, series_id: str
) -> None:
    series = [f"{series_id}-{i}" for i in range(40)]
    for sid in series:
        fit(client, sid, TRAINING)
    start = 2_000_000_000
    rows = [(sid, start + n, 100.0) for sid in series for n in range(2)]
    rows += [(sid, start + 2, 500.0) for sid in series]
    log = worker_log()
    env = {"INCIDENT_MIN_SERIES": "3", "INCIDENT_WINDOW_SECONDS": "5"}
    env["INCIDENT_SWEEP_SECONDS"] = "0.2"
    procs = [start_worker(s, name, log, **env) for name in ("w1", "w2")]
    try:
        for name, proc in zip(("w1", "w2"), procs, strict=True):
            wait_consuming(s, name, proc)
        with Publisher(redis_client, stream=s.stream_readings, shards=SHARDS) as pub:
            for sid, t, v in rows:
                pub.publish(sid, t, v)

        def incidents() -> list[dict[str, str]]:
            return [
                f
                for events in shard_events(redis_client, s).values()
                for f in events
                if f.get("type") == "incident"
            ]

        wait_for(
            lambda: [e for e in incidents() if e["state"] == "closed"], "the incident closed", 60
        )
        time.sleep(1.0)  # more sweeps by both workers: still one of each
    finally:
        for proc in procs:
            stop_process(proc)
    events = incidents()
    assert [e["state"] for e in events] == ["open", "closed"], log.read_text()
    assert int(events[1]["series_count"]) == 40
    # They are the first shard's, beside its incident keys (one slot).
    first = shards(s)[0]
    assert [f["state"] for f in shard_events(redis_client, s)[0] if "state" in f] == [
        "open",
        "closed",
    ]
    assert redis_client.hlen(incident_key(first.anomalies, "outbox")) == 0
