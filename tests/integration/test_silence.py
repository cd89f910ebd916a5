"""Silent series on real servers: one `no_data` event per silence with two workers, closed by
the next reading, kept across a worker killed and restarted, invisible to old subscribers."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import httpx
import pytest
import redis

from detector.redis_keys import silence_key
from detector.settings import Settings
from ingest.subscriber import Subscriber
from tests.support.polling import wait_for
from tests.support.processes import start_worker, stop_process, wait_consuming
from tests.support.streams import fit, publish, stream_settings

# Fits on timestamps 0, 1, 2 …: a cadence of 1 s. Silent after max(1, 2 × 1) = 2 s.
SHORT = {
    "SILENCE_CADENCES": "2",
    "SILENCE_MIN_SECONDS": "1",
    "SILENCE_SWEEP_SECONDS": "0.2",
}
TRAINING = [90.0, 110.0] * 5  # μ 100, σ 10: 100 is never anomalous, 500 always is


def no_data(client: redis.Redis, s: Settings, series_id: str) -> list[dict[str, str]]:
    return [
        f
        for _, f in client.xrange(s.stream_anomalies)  # type: ignore[union-attr]
        if f.get("type") == "no_data" and f["series_id"] == series_id
    ]


def worker_log() -> Path:
    return Path(tempfile.mkstemp(prefix="silence-", suffix=".log")[1])


@pytest.fixture
def s(settings: Settings) -> Settings:
    return stream_settings(settings, stream_batch_count=100)


def test_one_event_per_silence_with_two_workers_closed_by_the_next_reading(
    s: Settings, client: httpx.Client, redis_client: redis.Redis, series_id: str
) -> None:
    quiet, busy, never = f"{series_id}-quiet", f"{series_id}-busy", f"{series_id}-never"
    for sid in (quiet, busy, never):
        fit(client, sid, TRAINING)
    log = worker_log()
    workers = [start_worker(s, f"w{n}", log, **SHORT) for n in (1, 2)]
    try:
        for n, proc in enumerate(workers, 1):
            wait_consuming(s, f"w{n}", proc)
        publish(redis_client, s.stream_readings, [(quiet, 1000 + n, 100.0) for n in range(5)])
        started = time.monotonic()
        # `busy` keeps reporting every 0.5 s, well inside its 2 s: never silent.
        ts = 1000
        while not no_data(redis_client, s, quiet):
            assert time.monotonic() - started < 30, log.read_text()
            publish(redis_client, s.stream_readings, [(busy, ts, 100.0)])
            ts += 1
            time.sleep(0.5)
        assert time.monotonic() - started >= 2.0  # not before its threshold
        for _ in range(6):  # three more seconds of sweeps by both workers
            publish(redis_client, s.stream_readings, [(busy, ts, 100.0)])
            ts += 1
            time.sleep(0.5)
        (opened,) = no_data(redis_client, s, quiet)  # exactly one, whoever swept
        assert opened["state"] == "open"
        assert opened["timestamp"] == "1004"  # its last reading
        assert opened["model_version"] == "v1.0.0"
        assert float(opened["cadence_seconds"]) == 1.0
        assert float(opened["threshold_seconds"]) == 2.0
        assert float(opened["silent_seconds"]) >= 2.0
        assert opened["source_id"] == opened["silence_id"]
        assert no_data(redis_client, s, busy) == [] and no_data(redis_client, s, never) == []
        assert redis_client.hexists(silence_key(s.stream_anomalies, "silent"), quiet)

        # The next reading closes it, once; an anomalous one also gets its anomaly event.
        publish(redis_client, s.stream_readings, [(quiet, 2000, 500.0)])
        wait_for(lambda: len(no_data(redis_client, s, quiet)) == 2, "the closed event", 30)
        closed = no_data(redis_client, s, quiet)[1]
        assert closed["state"] == "closed" and closed["silence_id"] == opened["silence_id"]
        assert closed["resumed_timestamp"] == "2000"
        assert float(closed["silent_seconds"]) >= float(opened["silent_seconds"])
        entries = [f for _, f in redis_client.xrange(s.stream_anomalies) if f["series_id"] == quiet]
        assert [f.get("type") for f in entries][-2:] == ["no_data", "anomaly"]
        assert not redis_client.hexists(silence_key(s.stream_anomalies, "silent"), quiet)
    finally:
        for proc in workers:
            stop_process(proc)


def test_a_worker_killed_and_restarted_neither_loses_nor_repeats_a_silence(
    s: Settings, client: httpx.Client, redis_client: redis.Redis, series_id: str
) -> None:
    fit(client, series_id, TRAINING)
    log = worker_log()
    proc = start_worker(s, "w1", log, **SHORT)
    try:
        wait_consuming(s, "w1", proc)
        publish(redis_client, s.stream_readings, [(series_id, 1000 + n, 100.0) for n in range(3)])
        deadlines = silence_key(s.stream_anomalies, "deadlines")
        wait_for(lambda: redis_client.zscore(deadlines, series_id) is not None, "a deadline", 30)
        proc.kill()  # before the deadline: no worker is running when it passes
        proc.wait(30)
        time.sleep(3.0)
        assert no_data(redis_client, s, series_id) == []
        proc = start_worker(s, "w1", log, **SHORT)
        wait_for(lambda: no_data(redis_client, s, series_id), "the no_data event", 30)
        proc.kill()  # and again, after the event: the restarted worker must not repeat it
        proc.wait(30)
        proc = start_worker(s, "w1", log, **SHORT)
        wait_consuming(s, "w1", proc)
        time.sleep(2.0)
        assert len(no_data(redis_client, s, series_id)) == 1
    finally:
        stop_process(proc)


def test_subscribers_see_no_data_only_when_asked(
    s: Settings, redis_client: redis.Redis, series_id: str
) -> None:
    stream = s.stream_anomalies
    old = redis_client.xadd(stream, {"series_id": series_id, "timestamp": "1", "value": "0"})
    typed = redis_client.xadd(
        stream, {"series_id": series_id, "timestamp": "2", "value": "0", "type": "anomaly"}
    )
    redis_client.xadd(
        stream,
        {"series_id": series_id, "type": "no_data", "state": "open", "timestamp": "2"},
    )

    def ids(**kwargs: object) -> list[str]:
        subscriber = Subscriber(redis_client, stream=stream, start="0", block_ms=100, **kwargs)  # type: ignore[arg-type]
        return [e["id"] for e in subscriber.events(idle_timeout=0.3)]

    assert ids() == [old, typed]  # untyped (older) events are anomalies
    everything = ids(types=("anomaly", "no_data"))
    assert everything[:2] == [old, typed] and len(everything) == 3
    assert len(ids(types=("no_data",))) == 1


def test_events_feed_sends_no_data_only_when_asked(
    api_url: str, settings: Settings, redis_client: redis.Redis, series_id: str
) -> None:
    stream = settings.stream_anomalies  # the API under test reads the default stream
    first = redis_client.xadd(stream, {"series_id": series_id, "timestamp": "1", "value": "0"})
    silent = redis_client.xadd(
        stream, {"series_id": series_id, "type": "no_data", "state": "open", "timestamp": "1"}
    )
    last = redis_client.xadd(
        stream, {"series_id": series_id, "timestamp": "2", "value": "0", "type": "anomaly"}
    )

    def messages(**params: str) -> list[tuple[str, str]]:
        found: list[tuple[str, str]] = []
        event_id = name = ""
        timeout = httpx.Timeout(30, read=15)
        query = {"series_id": series_id, "last_id": f"{int(first.split('-')[0]) - 1}-0", **params}
        with (
            httpx.Client(base_url=api_url, timeout=timeout) as http,
            http.stream("GET", "/events", params=query) as response,
        ):
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("id: "):
                    event_id = line[4:]
                elif line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: "):
                    found.append((event_id, name))
                    if event_id == last:
                        return found
        return found

    assert messages() == [(first, "anomaly"), (last, "anomaly")]
    assert messages(types="anomaly,no_data") == [
        (first, "anomaly"),
        (silent, "no_data"),
        (last, "anomaly"),
    ]
    with httpx.Client(base_url=api_url) as http:
        assert http.get("/events", params={"types": "anomaly,gossip"}).status_code == 422


@pytest.mark.slow
def test_kafka_two_workers_one_event_per_silence_closed_by_the_next_reading(
    settings: Settings, client: httpx.Client, kafka_bootstrap: str, series_id: str
) -> None:
    from ingest.kafka import KafkaPublisher, KafkaSubscriber
    from tests.support.kafka import KafkaNames, KafkaWorker, create_topics, read_topic

    names = KafkaNames.fresh()
    create_topics(kafka_bootstrap, names)
    fit(client, series_id, TRAINING)

    def silences() -> list[dict[str, object]]:
        return [
            value
            for _, _, _, value in read_topic(kafka_bootstrap, names.anomalies)
            if value.get("type") == "no_data" and value["series_id"] == series_id
        ]

    def send(rows: list[tuple[int, float]]) -> None:
        with KafkaPublisher(f"kafka://{kafka_bootstrap}", topic=names.readings) as publisher:
            for timestamp, value in rows:
                publisher.publish(series_id, timestamp, value)

    workers = [KafkaWorker(settings, kafka_bootstrap, names, **SHORT) for _ in range(2)]
    try:
        send([(1000 + n, 100.0) for n in range(5)])
        wait_for(silences, "the no_data event", 60)
        time.sleep(2.0)  # more sweeps by both workers
        (opened,) = silences()
        assert opened["state"] == "open" and opened["timestamp"] == 1004
        assert opened["cadence_seconds"] == 1.0
        send([(2000, 100.0)])
        wait_for(lambda: len(silences()) == 2, "the closed event", 60)
        closed = silences()[1]
        assert closed["state"] == "closed" and closed["silence_id"] == opened["silence_id"]
        leases = silence_key(names.anomalies, "leases")
        r = redis.Redis.from_url(settings.redis_connection_url())
        assert r.zcard(leases) == 0  # produced and acknowledged: no lease left
        r.close()
        old = KafkaSubscriber(f"kafka://{kafka_bootstrap}", topic=names.anomalies, from_start=True)
        assert list(old.events(idle_timeout=3.0)) == []  # anomalies only: nothing here
    finally:
        for worker in workers:
            worker.stop()


def test_a_series_reporting_again_and_again_is_told_to_the_watch_once_a_slack(
    settings: Settings, client: httpx.Client
) -> None:
    """The watch's per-batch script gets a series again only once a tenth of the floor has
    passed (or on a refit): a fleet streaming fast costs Redis a few entries a second, not
    one a reading; its deadline is pushed before it could run out."""
    import asyncio
    import uuid

    from detector.state.silence import SeriesSeen, SilenceWatch
    from detector.store.connections import postgres_pool
    from detector.store.connections import redis_client as async_redis_client
    from detector.store.models import ModelStore

    series = [f"told-{uuid.uuid4().hex[:8]}-{i}" for i in range(3)]
    for sid in series:
        for _ in range(2):  # versions 1 and 2
            fit(client, sid, [float(v) for v in range(10)])

    async def go() -> tuple[str, str, str, float]:
        r, pool = async_redis_client(settings), postgres_pool(settings)
        await pool.open()
        try:
            output = f"anomalies-{uuid.uuid4().hex[:8]}"
            watch = SilenceWatch(r, ModelStore(r, pool), output=output, cadences=10, floor=3.0)

            def seen(version: int = 1) -> list[SeriesSeen]:
                return [SeriesSeen(s, version, 5, 5, 5, 1, "1-0") for s in series]

            async def calls() -> str:
                """The watch's record of a series: it changes at each entry it gets."""
                return str(await r.hget(watch.keys["series"], series[0]))

            await watch.observe(seen())
            first = await calls()
            for _ in range(20):
                await watch.observe(seen())  # within the slack (0.3 s): nothing sent
            quiet = await calls()
            await watch.observe(seen(version=2))  # a refit is told at once
            refit = await calls()
            await asyncio.sleep(0.35)
            deadline = await r.zscore(watch.keys["deadlines"], series[0])
            await watch.observe(seen(version=2))
            pushed = await r.zscore(watch.keys["deadlines"], series[0])
            return first, quiet, refit, (pushed or 0) - (deadline or 0)
        finally:
            await pool.close()
            await r.aclose()

    first, quiet, refit, moved = asyncio.run(go())
    assert quiet == first  # not one entry within the slack
    assert refit != quiet and refit.startswith("2 ")  # the refit's version, at once
    assert moved > 0.3  # past the slack, the deadline moves on
