"""A Redis Cluster master killed (SIGKILL) under load: its replica takes over, and the API and
the publisher carry on without a restart. Each test runs on a cluster of its own, with a
one-second node timeout (failover in a few seconds), so the session's cluster never notices.

What Redis' asynchronous replication can lose, and what REDIS_WAIT_REPLICAS keeps, is counted
here: every reading the publisher confirmed is looked for in the stream afterwards.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis
from redis.crc import key_slot

from detector.errors import StoreUnavailableError
from detector.fitting import new_fit
from detector.redis_keys import model_key
from detector.settings import Settings
from detector.shards import shard_of, shards
from detector.store.connections import postgres_pool, redis_client, sync_redis_client
from detector.store.models import ModelStore
from detector.store.replication import ReplicaWait
from embedded.processes import free_cluster_ports
from embedded.servers import RedisClusterServers, RedisServer
from ingest.publisher import NotReplicatedBatchError, Publisher, UnconfirmedBatchError
from tests.support.api import TS, VALUES
from tests.support.polling import wait_for
from tests.support.processes import start_worker, stop_process, wait_consuming
from tests.support.services import start_api
from tests.support.streams import shards_drained, stream_settings

NODE_TIMEOUT_MS = 1000
# From the kill to every series of the killed master fitted and predicted again (a failover
# takes two to four node timeouts; with a replica wait, the killed node must also come back).
RECOVERY_SECONDS = 30.0
WAIT_TIMEOUT_MS = 200
BATCH = 200
T0 = 1_700_000_000


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[RedisClusterServers]:
    servers = RedisClusterServers(
        tmp_path / "cluster", free_cluster_ports(6), node_timeout_ms=NODE_TIMEOUT_MS
    )
    servers.start()
    yield servers
    servers.stop()


# ------------------------------------------------------------------ the cluster's own view


def cluster_nodes(cluster: RedisClusterServers, port: int) -> dict[int, list[str]]:
    """CLUSTER NODES as one node sees it: port → [id, address, flags, master …]."""
    admin = cluster.admin(port)
    try:
        text = str(admin.execute_command("CLUSTER", "NODES"))
    finally:
        admin.close()
    lines = [line.split() for line in text.splitlines() if line]
    return {int(f[1].split("@")[0].rsplit(":", 1)[1]): f for f in lines}


def master_of(cluster: RedisClusterServers, key: str, ask: int) -> int:
    """The port of the master serving ``key``'s slot, as the node on ``ask`` sees it."""
    slot = key_slot(key.encode())
    admin = cluster.admin(ask)
    try:
        for start, end, master, *_ in admin.execute_command("CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return int(master[1])
    finally:
        admin.close()
    raise AssertionError(f"slot of {key} is not served")


def replica_of(cluster: RedisClusterServers, master: int) -> int | None:
    """The port of ``master``'s replica as ``master`` sees it (None: it has none)."""
    nodes = cluster_nodes(cluster, master)
    master_id = nodes[master][0]
    replicas = [port for port, f in nodes.items() if f[3] == master_id]
    return replicas[0] if replicas else None


def promoted(cluster: RedisClusterServers, victim: int, replica: int, ask: int) -> bool:
    """Whether the node on ``ask`` sees ``replica`` as a master and ``victim`` as failed, with
    every slot served (cluster_state:ok)."""
    nodes = cluster_nodes(cluster, ask)
    admin = cluster.admin(ask)
    try:
        state_ok = "cluster_state:ok" in str(admin.execute_command("CLUSTER", "INFO"))
    finally:
        admin.close()
    return (
        state_ok
        and "master" in nodes[replica][2].split(",")
        and "fail" in nodes[victim][2].split(",")
    )


def in_sync(cluster: RedisClusterServers, port: int) -> bool:
    admin = cluster.admin(port)
    try:
        return admin.info("replication").get("master_link_status") == "up"
    finally:
        admin.close()


def node_on(cluster: RedisClusterServers, port: int) -> RedisServer:
    (node,) = [n for n in cluster.nodes if n.port == port]
    return node


def series_on(cluster: RedisClusterServers, master: int, prefix: str, count: int) -> list[str]:
    """Series ids whose model keys lie in ``master``'s slots."""
    found: list[str] = []
    i = 0
    while len(found) < count:
        series_id = f"{prefix}-{i}"
        if master_of(cluster, model_key(series_id), master) == master:
            found.append(series_id)
        i += 1
    return found


# ------------------------------------------------------------------ the load


@dataclass
class Load:
    """What the publisher and the API's clients saw, shared with the test's thread."""

    stop: threading.Event = field(default_factory=threading.Event)
    published: list[int] = field(default_factory=list)  # reading timestamps, in order
    publisher: Publisher | None = None
    publish_errors: list[Exception] = field(default_factory=list)
    # (monotonic time, "fit" | "predict", series, status, version or detail)
    answers: list[tuple[float, str, str, int, str]] = field(default_factory=list)
    # series → the last version a fit answered 200 with
    fitted: dict[str, str] = field(default_factory=dict)
    failure: BaseException | None = None

    @property
    def confirmed(self) -> int:
        """The publisher's ``sent``: the first ``confirmed`` readings published are confirmed."""
        return self.publisher.sent if self.publisher is not None else 0

    def publish(self, settings: Settings, stream: str, wait_replicas: int) -> None:
        try:
            client = sync_redis_client(settings)
            with Publisher(
                client,
                stream=stream,
                batch_size=BATCH,
                wait_replicas=wait_replicas,
                wait_timeout_ms=WAIT_TIMEOUT_MS,
            ) as publisher:
                self.publisher = publisher
                n = 0
                while not self.stop.is_set():
                    try:
                        publisher.flush()  # a batch an error left in hand goes first
                        for _ in range(BATCH):  # the last one sends the batch
                            n += 1  # before publish: it raises once the reading is in hand
                            self.published.append(T0 + n)
                            publisher.publish("fo-pub", T0 + n, float(n % 7))
                    except UnconfirmedBatchError as exc:  # the same publisher carries on
                        self.publish_errors.append(exc)
                        time.sleep(0.05)
                self._drain(publisher)
            client.close()
        except BaseException as exc:
            self.failure = exc

    def _drain(self, publisher: Publisher) -> None:
        deadline = time.monotonic() + 30
        while True:
            try:
                publisher.flush()
                break
            except UnconfirmedBatchError as exc:
                self.publish_errors.append(exc)
                if time.monotonic() > deadline:
                    raise

    def call_api(self, base_url: str, series: list[str]) -> None:
        try:
            with httpx.Client(base_url=base_url, timeout=60) as http:
                i = 0
                while not self.stop.is_set():
                    series_id = series[i % len(series)]
                    i += 1
                    body = {"timestamps": TS, "values": VALUES, "sigma": 2 + i % 3}
                    answer = http.post(f"/fit/{series_id}", json=body)
                    self._record("fit", series_id, answer)
                    if answer.status_code == 200:
                        self.fitted[series_id] = answer.json()["version"]
                    answer = http.post(f"/predict/{series_id}", json={"timestamp": 1, "value": 10})
                    self._record("predict", series_id, answer)
        except BaseException as exc:
            self.failure = exc

    def _record(self, what: str, series_id: str, answer: httpx.Response) -> None:
        try:
            body = answer.json()
        except ValueError:  # a 500 is plain text
            body = {"detail": answer.text}
        detail = body.get("version") or body.get("model_version") or str(body.get("detail"))
        self.answers.append((time.monotonic(), what, series_id, answer.status_code, detail))

    def recovered(self, series: list[str], after: float) -> float | None:
        """When every series had a fit answered 200 after ``after`` and then a prediction
        answered with that fit's version, or None."""
        done: dict[str, float] = {}
        fitted: dict[str, str] = {}
        for at, what, series_id, status, detail in list(self.answers):
            if at <= after or status != 200 or series_id in done:
                continue
            if what == "fit":
                fitted[series_id] = detail
            elif fitted.get(series_id) == detail:
                done[series_id] = at
        return max(done.values()) if len(done) == len(series) else None


@dataclass
class Outcome:
    promoted_after: float
    replica_back: float  # with a replica wait: when the killed node was a synced replica
    recovered_after: float
    statuses: dict[int, int]
    published: int
    confirmed_at_kill: int
    lost: list[int]
    duplicated: int
    stale_fits: int
    publish_errors: int

    def __str__(self) -> str:
        lost = f"{len(self.lost)} lost" + (
            f" (readings {self.lost[0] - T0}-{self.lost[-1] - T0})" if self.lost else ""
        )
        back = f", a replica again after {self.replica_back:.1f} s" if self.replica_back else ""
        return (
            f"promoted after {self.promoted_after:.1f} s{back}, fit and predict again after"
            f" {self.recovered_after:.1f} s; API answers {self.statuses}; {self.published}"
            f" readings confirmed, {self.confirmed_at_kill} of them by the kill, {lost},"
            f" {self.duplicated} duplicated, {self.publish_errors} publisher errors; acknowledged"
            f" fits left behind: {self.stale_fits}"
        )


def failover(
    cluster: RedisClusterServers, base: Settings, *, wait_replicas: int
) -> tuple[Outcome, Load]:
    """Kill the master of the readings stream (and of three fitted series) mid-stream, wait
    for its replica's promotion and for the API and the publisher to carry on, then count."""
    settings = base.model_copy(update=cluster.settings_fields())
    stream = settings.stream_readings
    victim = master_of(cluster, stream, cluster.ports[0])
    replica = replica_of(cluster, victim)
    assert replica is not None
    survivor = next(p for p in cluster.ports if p not in (victim, replica))
    series = series_on(cluster, victim, f"fo-{uuid.uuid4().hex[:8]}", 3)
    env = {"REDIS_WAIT_REPLICAS": str(wait_replicas), "REDIS_WAIT_TIMEOUT_MS": str(WAIT_TIMEOUT_MS)}
    proc, base_url = start_api(settings, **env)
    load = Load()
    threads = [
        threading.Thread(target=load.publish, args=(settings, stream, wait_replicas)),
        threading.Thread(target=load.call_api, args=(base_url, series)),
    ]
    try:
        for thread in threads:
            thread.start()
        # Mid-stream: readings and fits confirmed, the publisher still going.
        wait_for(lambda: load.confirmed >= 10 * BATCH and len(load.fitted) == 3, "load", 30)
        assert load.failure is None, load.failure
        node_on(cluster, victim).stop(kill=True)
        killed = time.monotonic()
        confirmed_at_kill = load.confirmed
        wait_for(lambda: promoted(cluster, victim, replica, survivor), "the promotion", 30)
        promoted_after = time.monotonic() - killed
        replica_back = 0.0
        if wait_replicas:
            # The promoted master has no replica: the API and the publisher say so loudly
            # (503, NotReplicatedBatchError), never "done", until the killed node is back.
            def refused_loudly() -> bool:
                return any(
                    isinstance(e, NotReplicatedBatchError) for e in load.publish_errors
                ) and any(
                    at > killed and status == 503 and "REDIS_WAIT_REPLICAS" in detail
                    for at, _, _, status, detail in list(load.answers)
                )

            wait_for(refused_loudly, "a fit and a batch refused for want of a replica", 30)
            node_on(cluster, victim).start()  # it rejoins as the new master's replica
            wait_for(lambda: replica_of(cluster, replica) == victim, "the rejoin", 30)
            wait_for(lambda: in_sync(cluster, victim), "the new replica's sync", 30)
            replica_back = time.monotonic() - killed
        recovered = wait_for(lambda: load.recovered(series, killed), "recovery", RECOVERY_SECONDS)
        # The publisher too: batches confirmed after the promotion.
        after = load.confirmed
        wait_for(lambda: load.confirmed >= after + 5 * BATCH, "the publisher", RECOVERY_SECONDS)
        load.stop.set()
        for thread in threads:
            thread.join(60)
        client = sync_redis_client(settings)
        try:
            # A version whose put failed (after its commit) is owed and put again by the API
            # within seconds; one Redis lost after confirming it stays behind for good.
            def latest() -> dict[str, int]:
                pointers = {s: client.hget(model_key(s), "latest") for s in series}
                return {s: int(v) for s, v in pointers.items() if v is not None}

            def behind() -> list[str]:
                now = latest()
                return [s for s, v in load.fitted.items() if now.get(s, 0) < _number(v)]

            try:
                wait_for(lambda: not behind(), "the owed versions", 8)
            except AssertionError:
                pass  # counted below
            stale = behind()
            stream_ts = [int(f["timestamp"]) for _, f in client.xrange(stream)]
        finally:
            client.close()
    finally:
        load.stop.set()
        for thread in threads:
            thread.join(60)
        proc.terminate()
        proc.wait(30)
    assert load.failure is None, load.failure
    assert load.confirmed == len(load.published)  # everything published is confirmed at last
    in_stream = set(stream_ts)
    statuses: dict[int, int] = {}
    for *_, status, _ in load.answers:
        statuses[status] = statuses.get(status, 0) + 1
    outcome = Outcome(
        promoted_after=promoted_after,
        replica_back=replica_back,
        recovered_after=recovered - killed,
        statuses=statuses,
        published=len(load.published),
        confirmed_at_kill=confirmed_at_kill,
        lost=[ts for ts in load.published if ts not in in_stream],
        duplicated=len(stream_ts) - len(in_stream),
        stale_fits=len(stale),
        publish_errors=len(load.publish_errors),
    )
    print(f"\nfailover, REDIS_WAIT_REPLICAS={wait_replicas}: {outcome}")
    # Whatever the setting: the stream holds readings in publishing order, each at most once,
    # and the API answered 200 or 503 only.
    assert outcome.duplicated == 0
    assert stream_ts == [ts for ts in load.published if ts in in_stream]
    assert set(statuses) <= {200, 503}, [a for a in load.answers if a[3] not in (200, 503)]
    return outcome, load


def test_failover_loses_at_most_what_the_dead_master_had_not_replicated(cluster, settings):
    """Without a replica wait (the default) a failover can lose the readings the dead master
    confirmed last, never others: the lost ones, if any, are the newest confirmed before the
    kill (a replica holds a prefix of its master's writes). The API answers 503 while the
    killed master's slots have no master, then fits and predicts them again."""
    outcome, _ = failover(cluster, settings, wait_replicas=0)
    assert outcome.recovered_after < RECOVERY_SECONDS
    if outcome.lost:
        # Reading n is the n-th published (from 1): the lost ones are n = first … last, the
        # last confirmed by the kill (or in a reply still on its way: a batch more).
        first, last = outcome.lost[0] - T0, outcome.lost[-1] - T0
        assert outcome.lost == [T0 + n for n in range(first, last + 1)]
        assert outcome.confirmed_at_kill <= last <= outcome.confirmed_at_kill + BATCH


def test_failover_with_a_replica_wait_loses_nothing_confirmed(cluster, settings):
    """REDIS_WAIT_REPLICAS=1: a reading or a fit is confirmed only once the replica has it, so
    the promoted replica holds every one; while it has no replica of its own, writes to its
    slots are refused loudly (503, NotReplicatedBatchError) rather than confirmed."""
    outcome, load = failover(cluster, settings, wait_replicas=1)
    assert outcome.lost == []
    assert outcome.stale_fits == 0
    refusals = [e for e in load.publish_errors if isinstance(e, NotReplicatedBatchError)]
    assert "only 0 of the 1 replicas asked for acknowledged it" in str(refusals[0])


def test_too_few_replicas_fail_the_publish_and_the_fit(settings, series_id):
    """On one Redis without replicas, a wait for one can never be met: the batch is added
    (the master applied it) but reported as not confirmed, and resending it adds nothing; a
    fit is stored in PostgreSQL and answered with StoreUnavailableError (a 503) saying so."""
    stream = f"readings-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(settings.redis_connection_url(), decode_responses=True)
    publisher = Publisher(
        client, stream=stream, batch_size=3, retries=1, wait_replicas=1, wait_timeout_ms=50
    )
    try:
        with pytest.raises(NotReplicatedBatchError, match="not on replicas") as raised:
            for i in range(3):
                publisher.publish("s", T0 + i, 1.0)
        assert "only 0 of the 1 replicas asked for acknowledged it within 50 ms" in str(
            raised.value
        )
        assert "the master applied it" in str(raised.value)
        assert publisher.sent == 0
        with pytest.raises(NotReplicatedBatchError):
            publisher.flush()
        assert client.xlen(stream) == 3  # added once, not confirmed
    finally:
        client.delete(stream, publisher.key)
        client.close()

    async def fit() -> str:
        redis_async, pool = redis_client(settings), postgres_pool(settings)
        await pool.open()
        store = ModelStore(redis_async, pool, replica_wait=ReplicaWait(1, 50))
        try:
            fitted = new_fit(series_id, TS, VALUES, settings, kind="static")
            with pytest.raises(StoreUnavailableError) as refused:
                await store.save_fits([fitted])
            assert (await store.versions(series_id))[0].version == 1  # stored all the same
            return refused.value.detail
        finally:
            await store.publisher.close()
            await pool.close()
            await redis_async.aclose()

    detail = asyncio.run(fit())
    assert detail.startswith(f"the fit was stored as v1.0.0 of '{series_id}' in PostgreSQL")
    assert (
        "did not confirm it on replicas (REDIS_WAIT_REPLICAS): only 0 of the 1 replicas asked for"
        in detail
    )


def _number(version: str) -> int:
    """3 for "v3.0.0"."""
    return int(version.lstrip("v").split(".")[0])


# ------------------------------------------------------------------ the stream workers

SHARDS = 6
WORKER_TRAINING = [90.0, 110.0] * 5  # μ 100, σ 10: every reading of 500 is an anomaly


def test_sharded_workers_carry_on_through_a_failover_and_every_reading_is_counted(
    cluster: RedisClusterServers, settings: Settings, tmp_path: Path
) -> None:
    """Two sharded workers (STREAM_SHARDS=6) score a stream while the master of the first
    shard is killed with SIGKILL: the workers carry on without a restart, and every reading
    published is scored exactly once (each reading is an anomaly, so each gives one event),
    except those the dead master confirmed and had not replicated: those are only the victim
    master's shards' newest ones, a batch or two of each."""
    s = stream_settings(
        settings.model_copy(update=cluster.settings_fields()),
        stream_shards=SHARDS,
        stream_batch_count=100,
        stream_claim_idle_ms=1000,
    )
    every = shards(s)
    victim = master_of(cluster, every[0].readings, cluster.ports[0])
    replica = replica_of(cluster, victim)
    assert replica is not None
    survivor = next(p for p in cluster.ports if p not in (victim, replica))
    on_victim = {
        sh.index for sh in every if master_of(cluster, sh.readings, cluster.ports[0]) == victim
    }
    series = [f"fw-{uuid.uuid4().hex[:6]}-{i}" for i in range(24)]
    proc, base_url = start_api(s, STREAM_SHARDS=str(SHARDS))
    log = tmp_path / "workers.log"
    workers = []
    published: list[tuple[str, int]] = []
    errors: list[Exception] = []
    stop = threading.Event()
    confirmed = [0]

    def publish() -> None:
        client = sync_redis_client(s)
        with Publisher(client, stream=s.stream_readings, batch_size=50, shards=SHARDS) as pub:
            n = 0
            while not stop.is_set():
                try:
                    pub.flush()
                    for _ in range(len(series)):
                        sid, ts = series[n % len(series)], T0 + n // len(series)
                        n += 1
                        published.append((sid, ts))
                        pub.publish(sid, ts, 500.0)
                except UnconfirmedBatchError as exc:
                    errors.append(exc)
                    time.sleep(0.05)
                confirmed[0] = pub.sent
                time.sleep(0.002)
            deadline = time.monotonic() + 30
            while True:
                try:
                    pub.flush()
                    break
                except UnconfirmedBatchError as exc:
                    errors.append(exc)
                    assert time.monotonic() < deadline
            confirmed[0] = pub.sent
        client.close()

    thread = threading.Thread(target=publish)
    try:
        with httpx.Client(base_url=base_url, timeout=60) as http:
            for sid in series:
                answer = http.post(
                    f"/fit/{sid}",
                    json={"timestamps": list(range(10)), "values": WORKER_TRAINING},
                )
                assert answer.status_code == 200, answer.text
        workers = [start_worker(s, name, log) for name in ("w1", "w2")]
        for name, worker in zip(("w1", "w2"), workers, strict=True):
            wait_consuming(s, name, worker)
        thread.start()
        wait_for(lambda: confirmed[0] >= 2000, "readings flowing", 60)
        node_on(cluster, victim).stop(kill=True)
        killed = time.monotonic()
        at_kill = confirmed[0]
        wait_for(lambda: promoted(cluster, victim, replica, survivor), "the promotion", 30)
        promoted_after = time.monotonic() - killed
        after = confirmed[0]
        wait_for(lambda: confirmed[0] >= after + 2000, "the publisher after it", 60)
        stop.set()
        thread.join(60)
        client = sync_redis_client(s)
        try:
            wait_for(lambda: shards_drained(client, s), "every shard drained", 120)
            drained_after = time.monotonic() - killed
            for worker in workers:
                assert worker.poll() is None, log.read_text()  # never restarted
            scored = Counter(
                (f["series_id"], int(f["timestamp"]))
                for sh in every
                for _, f in client.xrange(sh.anomalies)
                if f.get("type", "anomaly") == "anomaly"
            )
        finally:
            client.close()
    finally:
        stop.set()
        if thread.is_alive():
            thread.join(60)
        for worker in workers:
            stop_process(worker)
        proc.terminate()
        proc.wait(30)
    assert confirmed[0] == len(published)  # everything published confirmed at last
    twice = [k for k, n in scored.items() if n > 1]
    assert not twice, twice[:5]
    assert set(scored) <= set(published)
    lost = [k for k in published if k not in scored]
    lost_shards = {shard_of(sid, SHARDS) for sid, _ in lost}
    print(
        f"\nfailover under sharded workers: promoted after {promoted_after:.1f} s, every shard"
        f" drained {drained_after:.1f} s after the kill; {len(published)} readings published"
        f" ({at_kill} confirmed by the kill), {len(scored)} scored once, {len(lost)} lost"
        f" (shards {sorted(lost_shards)}; the victim served {sorted(on_victim)}), 0 twice;"
        f" {len(errors)} publisher errors"
    )
    assert lost_shards <= on_victim, log.read_text()
    assert len(lost) <= 2 * 50 * len(on_victim)  # a batch or two a shard of the dead master
