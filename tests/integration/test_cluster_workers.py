"""The stream workers on a real Redis Cluster (three masters, three replicas) with sharded
streams: the shards spread over the masters, every reading is scored once with a worker killed
mid-stream, stateful states and episodes work, an outage across the shards is one incident,
and ``--check`` finds the workers' heartbeats."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
import redis

from detector.redis_keys import state_key
from detector.settings import Settings
from detector.shards import series_shard, shard_of, shards
from embedded.servers import RedisClusterServers
from ingest.publisher import Publisher
from tests.integration.test_cluster import master_of
from tests.support.polling import wait_for
from tests.support.processes import start_worker, stop_process, wait_consuming
from tests.support.services import ROOT, service_env
from tests.support.streams import (
    fit,
    fit_seasonal,
    shard_events,
    shards_drained,
    stream_settings,
)

SHARDS = 6
TRAINING = [90.0, 110.0] * 5  # μ 100, σ 10: 100 is never anomalous, 500 always is


@pytest.fixture
def s(cluster_settings: Settings) -> Settings:
    return stream_settings(
        cluster_settings, stream_shards=SHARDS, stream_batch_count=50, stream_claim_idle_ms=1000
    )


def worker_log() -> Path:
    return Path(tempfile.mkstemp(prefix="cluster-workers-", suffix=".log")[1])


def test_sharded_workers_score_every_reading_once_on_a_cluster_with_a_worker_killed(
    s: Settings,
    cluster_client: httpx.Client,
    rc: redis.Redis,
    redis_cluster: RedisClusterServers,
    series_id: str,
) -> None:
    # The shards' streams lie on every master (their tags' slots).
    assert len({master_of(redis_cluster, sh.readings) for sh in shards(s)}) == 3
    series = [f"{series_id}-{i}" for i in range(30)]
    for sid in series:
        fit(cluster_client, sid, TRAINING)
    seasonal = f"{series_id}-seasonal"
    later = fit_seasonal(cluster_client, seasonal)
    rows = [(sid, t, 500.0 if t % 10 == 9 else 100.0) for t in range(100) for sid in series]
    log = worker_log()
    procs = [start_worker(s, name, log) for name in ("w1", "w2")]
    try:
        for name, proc in zip(("w1", "w2"), procs, strict=True):
            wait_consuming(s, name, proc)
        # Both workers have live heartbeats, found over every master.
        check = subprocess.run(
            [sys.executable, "-m", "detector", "--check", "--consumer", "w1"],
            env=service_env(s, STREAM_READINGS=s.stream_readings, STREAM_SHARDS=str(SHARDS)),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert check.returncode == 0, check.stdout + check.stderr
        live = {json.loads(line)["consumer"] for line in check.stdout.splitlines()}
        assert live == {"w1", "w2"}

        with Publisher(rc, stream=s.stream_readings, shards=SHARDS) as pub:
            for t, v in later:
                pub.publish(seasonal, t, v)
            for n, (sid, t, v) in enumerate(rows):
                pub.publish(sid, t, v)
                if n == len(rows) // 3:
                    pub.flush()
                    time.sleep(0.3)  # both workers have batches in hand
                    procs[0].send_signal(signal.SIGKILL)
        assert pub.sent == len(rows) + 100
        procs[0].wait(10)
        wait_for(lambda: shards_drained(rc, s), "every shard drained", 120)
    finally:
        for proc in procs:
            stop_process(proc)

    by_shard = shard_events(rc, s)
    found = Counter(
        (f["series_id"], int(f["timestamp"]))
        for events in by_shard.values()
        for f in events
        if f["series_id"] != seasonal
    )
    assert found == Counter((sid, t) for sid, t, v in rows if v == 500.0), log.read_text()
    for index, events in by_shard.items():
        assert all(shard_of(f["series_id"], SHARDS) == index for f in events)
        # Episodes on: every event belongs to one (10 readings apart, one reading each).
        assert all(f.get("episode_id") for f in events if f["series_id"] != seasonal)
    home = series_shard(s, seasonal)
    assert rc.exists(state_key(seasonal, home.namespace)), log.read_text()


def test_an_outage_across_the_shards_is_one_incident_on_a_cluster(
    s: Settings, cluster_client: httpx.Client, rc: redis.Redis, series_id: str
) -> None:
    series = [f"{series_id}-{i}" for i in range(30)]
    for sid in series:
        fit(cluster_client, sid, TRAINING)
    start = 2_100_000_000
    rows = [(sid, start + n, 100.0) for sid in series for n in range(2)]
    rows += [(sid, start + 2, 500.0) for sid in series]
    log = worker_log()
    env = {"INCIDENT_MIN_SERIES": "3", "INCIDENT_WINDOW_SECONDS": "5"}
    env["INCIDENT_SWEEP_SECONDS"] = "0.2"
    proc = start_worker(s, "w1", log, **env)

    def incidents() -> list[dict[str, str]]:
        return [
            f
            for events in shard_events(rc, s).values()
            for f in events
            if f.get("type") == "incident"
        ]

    try:
        wait_consuming(s, "w1", proc)
        with Publisher(rc, stream=s.stream_readings, shards=SHARDS) as pub:
            for sid, t, v in rows:
                pub.publish(sid, t, v)
        wait_for(
            lambda: [e for e in incidents() if e["state"] == "closed"], "the incident closed", 60
        )
    finally:
        stop_process(proc)
    events = incidents()
    assert [e["state"] for e in events] == ["open", "closed"], log.read_text()
    assert int(events[1]["series_count"]) == 30
