"""The faust agent on a real Kafka-protocol broker (tansu): exact events, kill -9, scale-out."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pytest

from detector.wire.events import EVENT_FIELDS
from detector.wire.kafka import source_id
from ingest.kafka import KafkaPublisher
from tests.integration.test_worker import fit_series, make_readings
from tests.support.kafka import (
    KafkaNames,
    KafkaWorker,
    create_topics,
    group_caught_up,
    read_topic,
    send_raw,
)
from tests.support.polling import wait_for
from tests.support.services import ROOT, service_env

pytestmark = pytest.mark.slow


@pytest.fixture
def names(kafka_bootstrap: str) -> KafkaNames:
    names = KafkaNames.fresh()
    create_topics(kafka_bootstrap, names)
    return names


def publish(bootstrap: str, topic: str, rows: list[tuple[str, int, float]]) -> list[str]:
    """Publish through the ingest library's Kafka publisher; returns the records' source ids."""
    ids: list[str] = []
    with KafkaPublisher(f"kafka://{bootstrap}", topic=topic, batch_size=10**9) as publisher:
        for start in range(0, len(rows), 2000):
            for series_id, timestamp, value in rows[start : start + 2000]:
                publisher.publish(series_id, timestamp, value)
            ids += publisher.flush()
    return ids


def test_ten_thousand_readings_give_exactly_the_expected_events(
    settings, client, kafka_bootstrap, names
):
    series = fit_series(client, 4)
    rows, anomalous = make_readings(series, 10_000)
    ids = publish(kafka_bootstrap, names.readings, rows)
    # Poison after the good readings: dead letters, not crashes.
    with KafkaPublisher(f"kafka://{kafka_bootstrap}", topic=names.readings) as publisher:
        publisher.publish_fields({"series_id": series[0], "timestamp": "1.5", "value": "1"})
        publisher.publish_fields({"series_id": series[0], "timestamp": "1", "value": "1"})
        publisher.publish_fields(
            {"series_id": series[0], "timestamp": "1", "value": "1", "version": "v9"}
        )
    send_raw(kafka_bootstrap, names.readings, [b"not json", b"[1, 2]", b"{}"])

    worker = KafkaWorker(settings, kafka_bootstrap, names)
    try:
        wait_for(lambda: group_caught_up(kafka_bootstrap, names.app_id, names.readings), "commit")
        assert worker.scored() == 10_001  # the good readings and the one with timestamp "1"
        assert (
            worker.sample("stream_dead_letters_total", transport="kafka", reason="bad_timestamp")
            == 1
        )
        assert (
            worker.sample("stream_dead_letters_total", transport="kafka", reason="unknown_version")
            == 1
        )
        assert (
            worker.sample("stream_dead_letters_total", transport="kafka", reason="missing_field")
            == 3
        )
        assert worker.sample("stream_events_emitted_total", transport="kafka") == len(anomalous)
        assert worker.sample("anomalies_detected_total", source="stream") == len(anomalous)
    finally:
        worker.stop()

    got = read_topic(kafka_bootstrap, names.anomalies)
    by_source = {value["source_id"]: (key, value) for key, _, _, value in got}
    assert len(got) == len(by_source) == len(anomalous)  # no duplicate in a clean run
    assert set(by_source) == {ids[n] for n in anomalous}
    for n in anomalous:
        key, event = by_source[ids[n]]
        series_id, ts, value = rows[n]
        center = 100.0 * (series.index(series_id) + 1)
        assert key == series_id
        assert list(event)[: len(EVENT_FIELDS)] == list(EVENT_FIELDS)
        assert event["timestamp"] == ts and event["value"] == value
        assert event["model_version"] == "v1.0.0"
        assert (event["mean"], event["std"]) == (center, 10.0)
        assert (event["lower"], event["upper"]) == (center - 30.0, center + 30.0)
        assert event["score"] == pytest.approx((value - center) / 10.0)
    # A series stays on one partition, in order.
    for series_id in series:
        stamps = [v["timestamp"] for k, _, _, v in got if k == series_id]
        assert stamps == sorted(stamps) and stamps
        assert len({p for k, p, _, _ in got if k == series_id}) == 1
    dead = [value for _, _, _, value in read_topic(kafka_bootstrap, names.dead)]
    assert sorted(d["reason"] for d in dead) == [
        "bad_timestamp",
        *["missing_field"] * 3,
        "unknown_version",
    ]
    assert all(d["source_id"].startswith(f"{names.readings}/") for d in dead)


def test_a_killed_worker_restarts_without_losing_a_reading(
    settings, client, kafka_bootstrap, names
):
    series = fit_series(client, 4)
    rows, anomalous = make_readings(series, 10_000, seed=7)
    ids = publish(kafka_bootstrap, names.readings, rows[:5000])
    # Small batches, so the kill lands between many commits.
    worker = KafkaWorker(settings, kafka_bootstrap, names, KAFKA_BATCH_COUNT="50")
    try:
        wait_for(lambda: worker.scored() > 0, "the first batch")
    finally:
        worker.kill()  # SIGKILL: no shutdown, no final commit
    ids += publish(kafka_bootstrap, names.readings, rows[5000:])

    restarted = KafkaWorker(settings, kafka_bootstrap, names)
    try:
        wait_for(
            lambda: group_caught_up(kafka_bootstrap, names.app_id, names.readings),
            "the restarted worker to commit everything",
        )
    finally:
        restarted.stop()

    sources = Counter(
        value["source_id"] for _, _, _, value in read_topic(kafka_bootstrap, names.anomalies)
    )
    assert set(sources) == {ids[n] for n in anomalous}  # nothing lost
    duplicates = sum(sources.values()) - len(sources)
    # At-least-once: records past the last commit are scored again, so their events repeat.
    print(f"kill -9 and restart: {len(sources)} events, {duplicates} duplicates")


def test_two_workers_share_the_partitions(settings, client, kafka_bootstrap, names):
    series = fit_series(client, 8)
    rows, anomalous = make_readings(series, 10_000, seed=11)
    workers = [KafkaWorker(settings, kafka_bootstrap, names) for _ in range(2)]
    try:
        wait_for(
            lambda: all(
                w.sample("stream_consumer_lag", transport="kafka") is not None for w in workers
            ),
            "both workers' metrics",
        )
        wait_for(lambda: members(kafka_bootstrap, names.app_id) == 2, "a group of two")
        ids = publish(kafka_bootstrap, names.readings, rows)
        wait_for(lambda: group_caught_up(kafka_bootstrap, names.app_id, names.readings), "commit")
        scored = [w.scored() for w in workers]
    finally:
        for w in workers:
            w.stop()
    assert all(n > 0 for n in scored), scored  # both took partitions
    assert sum(scored) >= 10_000
    sources = {
        value["source_id"] for _, _, _, value in read_topic(kafka_bootstrap, names.anomalies)
    }
    assert sources == {ids[n] for n in anomalous}


def test_a_worker_killed_mid_stream_hands_its_partitions_to_the_other(
    settings, client, kafka_bootstrap, names
):
    """Two workers share the partitions; one is killed (SIGKILL) while readings flow: after
    the session timeout its partitions move to the survivor, which scores everything past
    the dead worker's last commit, so no anomaly is lost."""
    series = fit_series(client, 8)
    rows, anomalous = make_readings(series, 12_000, seed=13)
    workers = [KafkaWorker(settings, kafka_bootstrap, names, KAFKA_BATCH_COUNT="100")]
    workers.append(KafkaWorker(settings, kafka_bootstrap, names, KAFKA_BATCH_COUNT="100"))
    try:
        wait_for(lambda: members(kafka_bootstrap, names.app_id) == 2, "a group of two")
        ids = publish(kafka_bootstrap, names.readings, rows[:6000])
        wait_for(lambda: all(w.scored() > 0 for w in workers), "both workers scoring")
        workers[0].kill()  # mid-stream: no shutdown, no final commit
        ids += publish(kafka_bootstrap, names.readings, rows[6000:])
        wait_for(
            lambda: group_caught_up(kafka_bootstrap, names.app_id, names.readings),
            "the survivor to commit every partition",
            timeout=120,
        )
        assert members(kafka_bootstrap, names.app_id) == 1
    finally:
        for w in workers:
            if w.proc.poll() is None:
                w.stop()
    sources = Counter(
        value["source_id"] for _, _, _, value in read_topic(kafka_bootstrap, names.anomalies)
    )
    assert set(sources) == {ids[n] for n in anomalous}  # nothing lost
    print(
        f"kill -9 of one of two: {len(sources)} events, {sum(sources.values()) - len(sources)}"
        " repeated past the dead worker's last commit"
    )


def members(bootstrap: str, group: str) -> int:
    """Members of a stable group with partitions assigned."""
    import asyncio

    from aiokafka.admin import AIOKafkaAdminClient

    async def describe() -> int:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            (response,) = await admin.describe_consumer_groups([group])
            groups = response.to_object()["groups"]
            if not groups or groups[0]["state"] != "Stable":
                return 0
            return len(groups[0]["members"])
        finally:
            await admin.close()

    return asyncio.run(describe())


def test_ingest_cli_publishes_and_subscribes_over_kafka(settings, client, kafka_bootstrap, names):
    series = fit_series(client, 1)[0]
    worker = KafkaWorker(settings, kafka_bootstrap, names)
    base = [sys.executable, "-m", "ingest", "--transport", "kafka"]
    base += ["--kafka-bootstrap", f"kafka://{kafka_bootstrap}"]
    env = service_env(settings)
    try:
        lines = [
            {"series_id": series, "timestamp": 1_700_000_000 + i, "value": v}
            for i, v in enumerate([100.0, 200.0, 95.0, 300.0])
        ]
        published = subprocess.run(
            [*base, "--stream", names.readings, "publish", "--stdin"],
            input="\n".join(json.dumps(line) for line in lines) + "\nnot json\n",
            capture_output=True, text=True, env=env, cwd=ROOT, timeout=60,
        )  # fmt: skip
        assert published.returncode == 1  # one row refused
        assert "published 4 readings, 1 rows refused" in published.stderr
        tail = subprocess.run(
            [*base, "--stream", names.anomalies, "subscribe", "--from-start", "--count", "2"],
            capture_output=True, text=True, env=env, cwd=ROOT, timeout=60,
        )  # fmt: skip
    finally:
        worker.stop()
    assert tail.returncode == 0, tail.stderr
    got = [json.loads(line) for line in tail.stdout.splitlines()]
    assert [(e["timestamp"], e["value"]) for e in got] == [
        (1_700_000_001, 200.0),
        (1_700_000_003, 300.0),
    ]
    assert all(e["series_id"] == series and e["id"].startswith(f"{names.anomalies}/") for e in got)
    assert {e["source_id"].rsplit("/", 2)[0] for e in got} == {names.readings}
    assert source_id("t", 1, 2) == "t/1/2"
