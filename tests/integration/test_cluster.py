"""The REST path, the publisher and the subscriber on a real Redis Cluster (three masters,
three replicas); the stream worker refuses one without sharded streams, the Kafka worker
refuses it always (the sharded workers: test_cluster_workers.py)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
from redis.crc import key_slot

from detector.redis_keys import (
    backfill_namespace,
    episode_key,
    model_key,
    producer_key,
    state_key,
)
from detector.settings import Settings
from embedded.servers import RedisClusterServers
from ingest.publisher import Publisher
from ingest.subscriber import Subscriber
from tests.support.api import TS, VALUES, fit
from tests.support.services import ROOT, service_env


def master_of(cluster: RedisClusterServers, key: str) -> int:
    """The port of the master serving ``key``'s slot, from the cluster's own layout."""
    admin = cluster.admin(cluster.ports[0])
    try:
        slot = key_slot(key.encode())
        for start, end, master, *_ in admin.execute_command("CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return int(master[1])
    finally:
        admin.close()
    raise AssertionError(f"slot of {key} is not served")


def series_on_every_master(cluster: RedisClusterServers, prefix: str, each: int) -> list[str]:
    """Series ids whose keys land ``each`` on every master."""
    by_master: dict[int, list[str]] = {}
    i = 0
    while len(by_master) < cluster.masters or min(map(len, by_master.values())) < each:
        series_id = f"{prefix}-{i}"
        found = by_master.setdefault(master_of(cluster, model_key(series_id)), [])
        if len(found) < each:
            found.append(series_id)
        i += 1
    return [s for ids in by_master.values() for s in ids]


def test_rest_path_on_a_cluster(cluster_client, redis_cluster):
    prefix = f"cl-{uuid.uuid4().hex[:8]}"
    series = series_on_every_master(redis_cluster, prefix, each=2)
    for series_id in series:
        assert fit(cluster_client, series_id)["version"] == "v1.0.0"
    # Each model hash is on the master its slot names (the others answer MOVED for it).
    for series_id in series:
        node = redis_cluster.admin(master_of(redis_cluster, model_key(series_id)))
        try:
            assert node.hget(model_key(series_id), "latest") == "1", series_id
        finally:
            node.close()
    assert len({master_of(redis_cluster, model_key(s)) for s in series}) == redis_cluster.masters

    high = max(VALUES) + 100
    for series_id in series:
        answer = cluster_client.post(f"/predict/{series_id}", json={"timestamp": 1, "value": high})
        assert answer.status_code == 200, answer.text
        assert answer.json()["anomaly"] is True
        assert answer.json()["model_version"] == "v1.0.0"
    batch = cluster_client.post(
        f"/predict/{series[0]}/batch", json={"timestamps": [1, 2], "values": [10.0, high]}
    )
    assert batch.status_code == 200, batch.text
    assert batch.json()["anomaly"] == [False, True]

    page = cluster_client.get("/models", params={"after": prefix, "limit": 100}).json()
    listed = {item["series_id"] for item in page["items"] if item["series_id"].startswith(prefix)}
    assert listed == set(series)
    assert cluster_client.get(f"/models/{series[1]}").json()["versions"][0]["version"] == "v1.0.0"
    plot = cluster_client.get("/plot", params={"series_id": series[2]})
    assert plot.status_code == 200 and plot.headers["content-type"] == "image/png"

    health = cluster_client.get("/healthcheck")
    assert health.status_code == 200, health.text
    assert health.json()["dependencies"] == {"redis": "ok", "postgres": "ok"}


def test_bulk_fit_on_a_cluster(cluster_client, redis_cluster):
    """A bulk fit's batch spans every master: probed on each, its models put by one pipeline
    that the client splits by slot, each on the master its slot names."""
    prefix = f"cl-bulk-{uuid.uuid4().hex[:8]}"
    series = series_on_every_master(redis_cluster, prefix, each=3)
    body = {"series": [{"series_id": s, "timestamps": TS, "values": VALUES} for s in series]}
    answer = cluster_client.post("/fit", json=body)
    assert answer.status_code == 200, answer.text
    assert [f["version"] for f in answer.json()["fitted"]] == ["v1.0.0"] * len(series)
    for series_id in series:
        node = redis_cluster.admin(master_of(redis_cluster, model_key(series_id)))
        try:
            assert node.hget(model_key(series_id), "latest") == "1", series_id
        finally:
            node.close()
        predicted = cluster_client.post(
            f"/predict/{series_id}", json={"timestamp": 1, "value": max(VALUES) + 100}
        )
        assert predicted.json() == {"anomaly": True, "model_version": "v1.0.0"}


def test_events_feed_on_a_cluster(cluster_api_url, cluster_settings, rc, series_id):
    """GET /events catches up from a given id, then follows the live stream."""
    stream = cluster_settings.stream_anomalies
    first = rc.xadd(stream, {"series_id": series_id, "timestamp": "0", "value": "1"})
    missed = rc.xadd(stream, {"series_id": series_id, "timestamp": "1", "value": "1"})

    async def scenario() -> list[str]:
        async with (
            httpx.AsyncClient(base_url=cluster_api_url, timeout=30) as http,
            http.stream(
                "GET", "/events", params={"series_id": series_id, "last_id": first}
            ) as response,
        ):
            assert response.status_code == 200
            lines = response.aiter_lines()
            got = [await _next_id(lines, series_id)]
            live = rc.xadd(stream, {"series_id": series_id, "timestamp": "2", "value": "1"})
            got.append(await _next_id(lines, series_id))
            assert got == [missed, live]
            return got

    assert len(asyncio.run(asyncio.wait_for(scenario(), 30))) == 2


async def _next_id(lines: AsyncIterator[str], series_id: str) -> str:
    event_id = ""
    async for line in lines:
        if line.startswith("id: "):
            event_id = line[4:]
        elif line.startswith("data: ") and json.loads(line[6:]).get("series_id") == series_id:
            return event_id
    raise AssertionError("the stream ended")


def test_a_refit_is_predicted_at_once_on_a_cluster(cluster_client, series_id):
    """No pointer cache on a cluster: the next prediction reads the new `latest`."""
    fit(cluster_client, series_id)
    fit(cluster_client, series_id, sigma=4)
    answer = cluster_client.post(f"/predict/{series_id}", json={"timestamp": 1, "value": 10.0})
    assert answer.json()["model_version"] == "v2.0.0"


@pytest.mark.parametrize("kind", ["seasonal", "multiscale", "static"])
def test_backfill_over_rest_on_a_cluster_gives_what_one_redis_gives(
    client, cluster_client, rc, kind
):
    """A job's states and episodes share its hash tag (``backfill_namespace``), so its
    scripts touch one slot: on the cluster it scores the history as on one Redis."""
    from tests.integration import test_backfill as bf

    tag = uuid.uuid4().hex[:8]
    one, clustered = f"bf-one-{tag}", f"bf-cl-{tag}"
    bf.fit(client, one, kind)
    bf.fit(cluster_client, clustered, kind)
    values = bf.history(1500, 7)
    ts = [bf.START + bf.STEP * (bf.FIT_POINTS + i) for i in range(len(values))]
    body = {"timestamps": ts, "values": values}
    here = client.post(f"/backfill/{one}", json=body)
    there = cluster_client.post(f"/backfill/{clustered}", json=body)
    assert here.status_code == there.status_code == 200, there.text
    a, b = here.json(), there.json()
    assert a["anomalies"] == b["anomalies"] > 0 and a["scored"] == b["scored"] == 1500

    def strip(e):
        return {k: v for k, v in e.items() if k not in {*bf.IDS, "series_id"}}

    assert [strip(e) for e in b["events"]] == [strip(e) for e in a["events"]]
    assert bf.onsets(b["events"]) == bf.onsets(a["events"])
    namespace = backfill_namespace(b["job"])
    if kind != "static":
        assert rc.exists(state_key(clustered, namespace))
    assert key_slot(state_key(clustered, namespace).encode()) == key_slot(
        episode_key(clustered, namespace).encode()
    )
    streamed = rc.xrange(Settings().stream_backfill, "-", "+")
    assert sum(f.get("backfill") == b["job"] for _, f in streamed) == b["anomalies"]


def test_publisher_and_subscriber_on_a_cluster(rc):
    stream = f"readings-{uuid.uuid4().hex[:8]}"
    with Publisher(rc, stream=stream, batch_size=7, producer_id="cl") as publisher:
        assert key_slot(publisher.key.encode()) == key_slot(stream.encode())
        for i in range(25):
            publisher.publish("cl-series", 1_700_000_000 + i, float(i))
    assert rc.xlen(stream) == 25
    assert not rc.exists(producer_key(stream, "cl"))  # dropped when the block ended

    anomalies = f"anomalies-{uuid.uuid4().hex[:8]}"
    for i in range(3):
        rc.xadd(anomalies, {"series_id": f"s{i}", "timestamp": str(i), "value": "1.5"})
    tail = Subscriber(rc, stream=anomalies, start="0", block_ms=100)
    assert [e["series_id"] for e in tail.events(limit=3)] == ["s0", "s1", "s2"]
    durable = Subscriber(rc, stream=anomalies, start="0", group="g", consumer="c", block_ms=100)
    assert len(list(durable.events(limit=3))) == 3
    assert rc.xpending(anomalies, "g")["pending"] == 0  # each acknowledged


def ingest(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ingest", *args],
        env=service_env(settings),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_ingest_cli_publishes_and_subscribes_on_a_cluster(cluster_settings, rc, tmp_path):
    stream = f"readings-{uuid.uuid4().hex[:8]}"
    path = tmp_path / "readings.csv"
    path.write_text("timestamp,value\n" + "".join(f"{1_700_000_000 + i},{i}\n" for i in range(40)))
    done = ingest(
        cluster_settings, "--stream", stream, "publish", "--csv", str(path),
        "--series-id", "cl-cli", "--batch-size", "16",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert rc.xlen(stream) == 40

    anomalies = f"anomalies-{uuid.uuid4().hex[:8]}"
    for i in range(2):
        rc.xadd(anomalies, {"series_id": "cl-cli", "timestamp": str(i), "value": "9"})
    done = ingest(
        cluster_settings, "--stream", anomalies, "subscribe", "--from-start", "--count", "2",
        "--idle-timeout", "10",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 2


def test_ingest_cli_bulk_fits_on_a_cluster(cluster_settings, redis_cluster, tmp_path):
    prefix = f"cl-fit-{uuid.uuid4().hex[:8]}"
    series = series_on_every_master(redis_cluster, prefix, each=2)
    path = tmp_path / "fit.csv"
    path.write_text(
        "series_id,timestamp,value\n"
        + "".join(f"{s},{t},{v}\n" for s in series for t, v in zip(TS, VALUES, strict=True))
    )
    done = ingest(cluster_settings, "fit", "--csv", str(path), "--kind", "static")
    assert done.returncode == 0, done.stderr
    assert f"{len(series)} series fitted, 0 refused" in done.stderr
    for series_id in series:
        node = redis_cluster.admin(master_of(redis_cluster, model_key(series_id)))
        try:
            assert node.hget(model_key(series_id), "latest") == "1", series_id
        finally:
            node.close()


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["-m", "detector"], "runs on Redis Cluster with sharded streams only"),
        (["-m", "detector", "--check"], "runs on Redis Cluster with sharded streams only"),
        (
            ["-m", "detector.transports.kafka", "worker"],
            "the Kafka worker runs on Redis Cluster with sharded streams only",
        ),
    ],
)
def test_workers_refuse_a_cluster_they_cannot_run_on(argv, says):
    """The workers without STREAM_SHARDS: refused before anything is reached (the seed
    needs no server behind it)."""
    env = service_env(Settings(), REDIS_CLUSTER_NODES="127.0.0.1:1")
    done = subprocess.run(
        [sys.executable, *argv], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    assert says in done.stderr


def test_ingest_cli_backfills_on_a_cluster(cluster_settings, cluster_client, rc, tmp_path):
    """`anomaly-ingest backfill --csv` on the cluster, in chunks that end mid-history: the
    events of one call over REST on the same cluster."""
    from tests.integration import test_backfill as bf

    series_id = f"bf-cli-{uuid.uuid4().hex[:8]}"
    bf.fit(cluster_client, series_id, "seasonal")
    values = bf.history(1200, 9)
    ts = [bf.START + bf.STEP * (bf.FIT_POINTS + i) for i in range(len(values))]
    path = tmp_path / "history.csv"
    path.write_text("timestamp,value\n" + "".join(f"{t},{v}\n" for t, v in zip(ts, values)))
    stream = f"anomalies:backfill:{uuid.uuid4().hex[:8]}"
    command = [sys.executable, "-m", "ingest", "--stream", stream, "backfill", "--csv", str(path)]
    done = subprocess.run(
        [*command, "--series-id", series_id, "--job", "cli-job"],
        env=service_env(cluster_settings, BACKFILL_CHUNK="500"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "backfill cli-job: 1200 readings scored" in done.stderr
    written = [f for _, f in rc.xrange(stream, "-", "+")]
    rest = cluster_client.post(f"/backfill/{series_id}", json={"timestamps": ts, "values": values})
    assert rest.status_code == 200, rest.text
    expected = rest.json()["events"]
    assert len(written) == len(expected) > 0

    def strip(e):
        return {k: str(v) for k, v in e.items() if k not in bf.IDS}

    assert [strip(e)["timestamp"] for e in written] == [strip(e)["timestamp"] for e in expected]
    assert [e["severity"] for e in written] == [str(e["severity"]) for e in expected]
