"""One anomalies feed over STREAM_SHARDS streams: the Subscriber, `anomaly-ingest subscribe`
and GET /events merge the shards' streams, on one Redis and on a Redis Cluster, and resume
exactly from a per-shard cursor."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis
from redis.crc import key_slot

from detector.settings import Settings
from detector.shards import anomalies_streams
from detector.store.connections import sync_redis_client
from embedded.servers import RedisClusterServers
from ingest.subscriber import Subscriber
from tests.support.services import ROOT, service_env, start_api

SHARDS = 4


def sharded(settings: Settings) -> Settings:
    """``settings`` with four shards of an anomalies stream of this test's own."""
    name = f"anomalies-{uuid.uuid4().hex[:10]}"
    return settings.model_copy(update={"stream_shards": SHARDS, "stream_anomalies": name})


def shard_env(settings: Settings) -> dict[str, str]:
    return {
        "STREAM_SHARDS": str(settings.stream_shards),
        "STREAM_ANOMALIES": settings.stream_anomalies,
    }


def add_round_robin(
    client: redis.Redis, streams: list[str], series_id: str, timestamps: range
) -> dict[int, tuple[int, str]]:
    """One event a timestamp, shard ``timestamp % len(streams)``: timestamp -> (shard, id)."""
    added = {}
    for ts in timestamps:
        shard = ts % len(streams)
        entry = client.xadd(streams[shard], {"series_id": series_id, "timestamp": str(ts)})
        added[ts] = (shard, str(entry))
    return added


def entry_order(entry_id: str) -> tuple[int, int]:
    ms, seq = entry_id.split("-")
    return int(ms), int(seq)


def assert_each_stream_in_order(events: list[dict[str, Any]]) -> None:
    by_stream: dict[str, list[tuple[int, int]]] = {}
    for event in events:
        by_stream.setdefault(event["stream"], []).append(entry_order(event["id"]))
    for ids in by_stream.values():
        assert ids == sorted(ids)


def ingest(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ingest", *args],
        env=service_env(settings, **shard_env(settings)),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def rc(cluster_settings: Settings) -> Iterator[redis.Redis]:
    """A cluster client as the service user, as the ingest CLI makes it."""
    client = sync_redis_client(cluster_settings)
    yield client
    client.close()


def test_the_shards_lie_on_every_master(redis_cluster: RedisClusterServers, cluster_settings):
    """The cluster tests below read shards of different masters (the tags decide the slots)."""
    admin = redis_cluster.admin(redis_cluster.ports[0])
    try:
        layout = admin.execute_command("CLUSTER", "SLOTS")
    finally:
        admin.close()
    masters = {
        int(master[1])
        for stream in anomalies_streams(sharded(cluster_settings))
        for start, end, master, *_ in layout
        if start <= key_slot(stream.encode()) <= end
    }
    assert len(masters) == redis_cluster.masters


@pytest.mark.parametrize("where", ["redis", "cluster"])
def test_subscriber_tails_every_shard_as_one_feed(where, request):
    base = request.getfixturevalue("settings" if where == "redis" else "cluster_settings")
    client = request.getfixturevalue("redis_client" if where == "redis" else "rc")
    s = sharded(base)
    streams = anomalies_streams(s)
    series_id = f"tail-{uuid.uuid4().hex[:8]}"
    past = add_round_robin(client, streams, series_id, range(0, 20))

    whole = Subscriber(client, streams=streams, start="0", block_ms=100)
    got = list(whole.events(idle_timeout=0.5))
    assert sorted(e["timestamp"] for e in got) == list(range(20))
    assert all(e["stream"] == streams[past[e["timestamp"]][0]] for e in got)
    assert all(e["id"] == past[e["timestamp"]][1] for e in got)
    assert_each_stream_in_order(got)

    # Resuming from one position a shard (the last id seen on each) gives exactly the rest.
    cursor = ",".join(
        max((e["id"] for e in got[:7] if e["stream"] == stream), key=entry_order, default="0-0")
        for stream in streams
    )
    rest = Subscriber(client, streams=streams, start=cursor, block_ms=100)
    seen = {e["timestamp"] for e in got[:7]}
    assert {e["timestamp"] for e in rest.events(idle_timeout=0.5)} == set(range(20)) - seen

    # From now on ("$", resolved at the first read): only what is added after it.
    live: list[dict[str, Any]] = []
    tail = Subscriber(client, streams=streams, block_ms=100)
    reader = threading.Thread(target=lambda: live.extend(tail.events(idle_timeout=3)))
    reader.start()
    markers = 0
    while not live and markers < 50:  # until the subscriber has read one
        client.xadd(streams[1], {"series_id": series_id, "timestamp": "100"})
        markers += 1
        reader.join(0.2)
    add_round_robin(client, streams, series_id, range(101, 112))
    reader.join(30)
    assert not reader.is_alive()
    timestamps = [e["timestamp"] for e in live]
    assert 1 <= timestamps.count(100) <= markers
    assert sorted(t for t in timestamps if t != 100) == list(range(101, 112))
    assert {e["stream"] for e in live} == set(streams)


def test_one_stream_reads_as_before(settings, redis_client):
    """``stream=`` (or ``streams=`` of one) yields what it always did: no ``stream`` key."""
    s = sharded(settings)
    streams = anomalies_streams(s)
    add_round_robin(redis_client, streams, "one", range(8))
    alone = Subscriber(redis_client, stream=streams[1], start="0", block_ms=100)
    got = list(alone.events(idle_timeout=0.3))
    assert [e["timestamp"] for e in got] == [1, 5]
    assert all(set(e) == {"id", "series_id", "timestamp"} for e in got)
    listed = Subscriber(redis_client, streams=streams[1:2], start="0", block_ms=100)
    assert list(listed.events(idle_timeout=0.3)) == got


@pytest.mark.parametrize("where", ["redis", "cluster"])
def test_a_durable_subscriber_acks_each_event_on_its_shard(where, request):
    base = request.getfixturevalue("settings" if where == "redis" else "cluster_settings")
    client = request.getfixturevalue("redis_client" if where == "redis" else "rc")
    s = sharded(base)
    streams = anomalies_streams(s)
    add_round_robin(client, streams, "durable", range(24))

    def subscriber() -> Subscriber:
        return Subscriber(
            client, streams=streams, start="0", group="audit", consumer="c", block_ms=100
        )

    read = subscriber().events(idle_timeout=0.5)
    first = [next(read)["timestamp"] for _ in range(5)]
    read.close()  # stopped while handling the fifth: the four before it are acknowledged
    assert all(client.xinfo_groups(stream)[0]["name"] == "audit" for stream in streams)
    pending = sum(client.xpending(stream, "audit")["pending"] for stream in streams)
    assert pending == 24 - 4  # the fifth, and what the reads had fetched beyond it

    # Restarted: the unfinished ones first (the fifth among them), each once.
    again = [e["timestamp"] for e in subscriber().events(idle_timeout=0.5)]
    assert first[-1] in again
    assert sorted(first[:-1] + again) == list(range(24))
    assert all(client.xpending(stream, "audit")["pending"] == 0 for stream in streams)
    assert list(subscriber().events(idle_timeout=0.3)) == []

    # New events after the restart reach the group from every shard, and are acknowledged.
    add_round_robin(client, streams, "durable", range(24, 32))
    assert sorted(e["timestamp"] for e in subscriber().events(idle_timeout=0.5)) == list(
        range(24, 32)
    )
    assert all(client.xpending(stream, "audit")["pending"] == 0 for stream in streams)


@pytest.mark.parametrize("where", ["redis", "cluster"])
def test_ingest_cli_subscribes_to_every_shard(where, request):
    base = request.getfixturevalue("settings" if where == "redis" else "cluster_settings")
    client = request.getfixturevalue("redis_client" if where == "redis" else "rc")
    s = sharded(base)
    streams = anomalies_streams(s)
    added = add_round_robin(client, streams, "cli", range(10))

    done = ingest(s, "subscribe", "--from-start", "--idle-timeout", "1")
    assert done.returncode == 0, done.stderr
    got = [json.loads(line) for line in done.stdout.splitlines()]
    assert sorted(e["timestamp"] for e in got) == list(range(10))
    assert all((streams.index(e["stream"]), e["id"]) == added[e["timestamp"]] for e in got)

    # --from: a cursor of the shards' positions resumes exactly; --stream reads one stream.
    seen = (0, 4)  # both on shard 0: the cursor is shard 0 after 4, the others from the start
    cursor = ",".join([added[4][1], "0-0", "0-0", "0-0"])
    assert all(added[t][0] == 0 for t in seen)
    done = ingest(s, "subscribe", "--from", cursor, "--idle-timeout", "1")
    assert done.returncode == 0, done.stderr
    rest = sorted(json.loads(line)["timestamp"] for line in done.stdout.splitlines())
    assert rest == sorted(set(range(10)) - set(seen))
    done = ingest(s, "--stream", streams[2], "subscribe", "--from-start", "--idle-timeout", "1")
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(e["timestamp"], "stream" in e) for e in lines] == [(2, False), (6, False)]
    done = ingest(s, "subscribe", "--from", "1-0,2-0", "--idle-timeout", "1")
    assert done.returncode != 0
    assert "2 positions for 4 streams" in done.stderr


# GET /events over four shards.


def sse_messages(response: httpx.Response) -> Iterator[tuple[str, dict[str, Any]]]:
    """(id, data) of each message of an open SSE response."""
    event_id = ""
    for line in response.iter_lines():
        if line.startswith("id: "):
            event_id = line[4:]
        elif line.startswith("data: "):
            yield event_id, json.loads(line[6:])


@pytest.fixture(scope="module")
def sharded_api(settings) -> Iterator[tuple[str, Settings]]:
    s = sharded(settings)
    proc, url = start_api(s, **shard_env(s))
    yield url, s
    proc.terminate()
    proc.wait(30)


@pytest.fixture(scope="module")
def sharded_cluster_api(cluster_settings) -> Iterator[tuple[str, Settings]]:
    s = sharded(cluster_settings)
    proc, url = start_api(s, **shard_env(s))
    yield url, s
    proc.terminate()
    proc.wait(30)


def check_cursors(
    messages: list[tuple[str, dict[str, Any]]], added: dict[int, tuple[int, str]], start: str
) -> None:
    """Each message's id is the shards' positions after it: its own entry in its shard, the
    others unchanged or moved forward, never back."""
    before = [entry_order(p) for p in start.split(",")]
    for cursor, data in messages:
        shard, entry = added[data["timestamp"]]
        positions = [entry_order(p) for p in cursor.split(",")]
        assert len(positions) == SHARDS
        assert positions[shard] == entry_order(entry), (cursor, data)
        assert all(b <= p for b, p in zip(before, positions, strict=True))
        before = positions


@pytest.mark.parametrize("where", ["redis", "cluster"])
def test_events_merge_every_shard_and_resume_exactly_by_last_event_id(where, request):
    url, s = request.getfixturevalue("sharded_api" if where == "redis" else "sharded_cluster_api")
    client = request.getfixturevalue("redis_client" if where == "redis" else "rc")
    streams = anomalies_streams(s)
    series_id = f"sse-{uuid.uuid4().hex[:8]}"
    timeout = httpx.Timeout(60, read=30)
    added = add_round_robin(client, streams, series_id, range(0, 20))
    params = {"series_id": series_id}

    with httpx.Client(base_url=url, timeout=timeout) as http:
        # One id for every shard: everything after it (here: everything).
        with http.stream("GET", "/events", params=params, headers={"Last-Event-ID": "0-0"}) as r:
            assert r.status_code == 200
            messages = sse_messages(r)
            first = [next(messages) for _ in range(10)]
        check_cursors(first, added, ",".join(["0-0"] * SHARDS))
        cursor = first[-1][0]

        # Missed while away: more than a catch-up page (100) in every shard.
        added |= add_round_robin(client, streams, series_id, range(20, 500))
        with http.stream("GET", "/events", params=params, headers={"Last-Event-ID": cursor}) as r:
            assert r.status_code == 200
            messages = sse_messages(r)
            second = [next(messages) for _ in range(150)]
            # Added during the catch-up: the live feed's, after the catch-up's.
            added |= add_round_robin(client, streams, series_id, range(500, 540))
            second += [next(messages) for _ in range(540 - 10 - 150)]
        check_cursors(second, added, cursor)

        got = [data["timestamp"] for _, data in first + second]
        assert len(got) == len(set(got)) == 540
        assert set(got) == set(range(540))
        # Each shard in its own order.
        for k in range(SHARDS):
            mine = [added[t][1] for t in got if added[t][0] == k]
            assert mine == sorted(mine, key=entry_order)

        # A live message's id resumes exactly too: nothing after the last one, then the next.
        last = second[-1][0]
        with http.stream("GET", "/events", params=params, headers={"Last-Event-ID": last}) as r:
            messages = sse_messages(r)
            added |= add_round_robin(client, streams, series_id, range(540, 541))
            assert next(messages)[1]["timestamp"] == 540


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        ("1-0,2-0", "has 2 ids"),
        ("1-0,2-0,3-0,4-0,5-0", "has 5 ids"),
        ("1-0,x,3-0,4-0", "'x' is not an entry id"),
        ("1-0,2-0,,4-0", "'' is not an entry id"),
        (f"1-0,2-0,3-0,{2**64}-0", "is not an entry id"),
        ("x-1", "'x-1' is not an entry id"),
    ],
)
def test_a_malformed_cursor_is_422(sharded_api, bad, why):
    url, _ = sharded_api
    with httpx.Client(base_url=url, timeout=30) as http:
        for answer, name in (
            (http.get("/events", headers={"Last-Event-ID": bad}), "Last-Event-ID"),
            (http.get("/events", params={"last_id": bad}), "last_id"),
        ):
            assert answer.status_code == 422, answer.text
            detail = answer.json()["detail"]
            assert name in detail and why in detail and f"{SHARDS} stream entry ids" in detail


def test_one_shard_takes_one_entry_id_as_before(client):
    answer = client.get("/events", headers={"Last-Event-ID": "1-0,2-0"})
    assert answer.status_code == 422, answer.text
    assert "Last-Event-ID must be a stream entry id" in answer.json()["detail"]
