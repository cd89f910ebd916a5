"""The ingest library and CLI: publishing readings and tailing anomaly events, end to end."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from importlib import resources

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ingest.publisher import InvalidReadingError, Publisher, UnconfirmedBatchError
from ingest.subscriber import Subscriber
from tests.support.services import ROOT, service_env
from tests.support.streams import events, fit, run_worker, stream_settings
from tests.support.tcp_proxy import ReplyDroppingProxy


def ingest(settings, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ingest", *args],
        env=service_env(settings),
        cwd=ROOT,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_publish_csv_reports_malformed_rows_by_line(settings, redis_client, tmp_path, series_id):
    s = stream_settings(settings)
    path = tmp_path / "readings.csv"
    path.write_text(
        "timestamp,value\n"
        "1700000000,1.5\n"
        "1700000060,abc\n"
        "2024-01-01 00:00:00,2.5\n"
        "-5,3\n"
        "1700000120,4\n"
    )
    done = ingest(
        settings, "--stream", s.stream_readings, "publish", "--csv", str(path),
        "--series-id", series_id,
    )  # fmt: skip
    assert done.returncode == 1
    assert f"{path}:3: row not sent: value must be a finite number" in done.stderr
    assert f"{path}:5: row not sent: timestamp" in done.stderr
    entries = [f for _, f in events(redis_client, s.stream_readings)]
    assert [(f["series_id"], f["timestamp"], f["value"]) for f in entries] == [
        (series_id, "1700000000", "1.5"),
        (series_id, "1704067200", "2.5"),
        (series_id, "1700000120", "4"),
    ]


def test_publish_stdin_json_lines(settings, redis_client, series_id):
    s = stream_settings(settings)
    lines = [
        json.dumps({"timestamp": 1, "value": 2.5}),
        "{not json",
        json.dumps({"series_id": "other.series", "timestamp": 2.0, "value": 3, "version": "v2"}),
        json.dumps({"timestamp": 3}),
    ]
    done = ingest(
        settings, "--stream", s.stream_readings, "publish", "--stdin", "--series-id", series_id,
        stdin="\n".join(lines) + "\n",
    )  # fmt: skip
    assert done.returncode == 1
    assert "stdin:2: row not sent" in done.stderr
    assert "stdin:4: row not sent: missing field(s): value" in done.stderr
    entries = [f for _, f in events(redis_client, s.stream_readings)]
    assert entries == [
        {"series_id": series_id, "timestamp": "1", "value": "2.5"},
        {"series_id": "other.series", "timestamp": "2", "value": "3.0", "version": "v2"},
    ]


def test_publish_then_subscribe_round_trip(settings, client, redis_client, tmp_path, series_id):
    s = stream_settings(settings)
    fit(client, series_id, [90.0, 110.0] * 5)  # bound 130
    path = tmp_path / "r.csv"
    path.write_text("timestamp,value\n" + "".join(f"{t},{v}\n" for t, v in
                    [(1, 100), (2, 200), (3, 120), (4, 131), (5, 99)]))  # fmt: skip
    done = ingest(
        settings, "--stream", s.stream_readings, "publish", "--csv", str(path),
        "--series-id", series_id,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    redis_client.xadd(s.stream_anomalies, {"series_id": "someone-else", "timestamp": "9"})
    run_worker(s)

    done = ingest(
        settings, "--stream", s.stream_anomalies, "subscribe", "--from-start",
        "--series", series_id, "--idle-timeout", "0.5",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    got = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(e["timestamp"], e["value"], e["model_version"]) for e in got] == [
        (2, 200.0, "v1.0.0"),
        (4, 131.0, "v1.0.0"),
    ]
    assert got[0]["upper"] == 130.0 and got[0]["score"] == 10.0 and got[0]["id"]

    done = ingest(
        settings, "--stream", s.stream_anomalies, "subscribe", "--from", got[0]["id"],
        "--count", "1",
    )  # fmt: skip
    assert [json.loads(line)["timestamp"] for line in done.stdout.splitlines()] == [4]


def test_generate_publishes_the_requested_readings(settings, redis_client):
    s = stream_settings(settings)
    done = ingest(
        settings, "--stream", s.stream_readings, "generate", "--count", "300", "--series", "3",
        "--prefix", "gen-test", "--anomaly-ratio", "0.1", "--seed", "1", "--batch-size", "64",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    entries = [f for _, f in events(redis_client, s.stream_readings)]
    assert len(entries) == 300
    assert {f["series_id"] for f in entries} == {"gen-test-0", "gen-test-1", "gen-test-2"}


def test_generate_fit_trains_on_the_window_just_before_the_stream(
    settings, api_url, redis_client, pg
):
    s = stream_settings(settings)
    prefix = f"gen-fit-{uuid.uuid4().hex[:8]}"
    done = ingest(
        settings, "--stream", s.stream_readings, "generate", "--count", "40", "--series", "2",
        "--prefix", prefix, "--seed", "1", "--fit", api_url,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    streamed = [int(f["timestamp"]) for _, f in events(redis_client, s.stream_readings)]
    for series_id in (f"{prefix}-0", f"{prefix}-1"):
        fitted = [
            ts
            for (ts,) in pg.execute(
                "SELECT p.ts FROM training_point_rows p JOIN model_versions m ON m.id = p.model_id"
                " WHERE m.series_id = %s ORDER BY p.ts",
                (series_id,),
            )
        ]
        # the same 1 s cadence as the stream, ending one step before its first reading
        assert len(fitted) == 500
        assert fitted == list(range(fitted[0], fitted[0] + 500))
        assert fitted[-1] == min(streamed) - 1


def test_publisher_refuses_bad_readings_before_sending(settings, redis_client, series_id):
    s = stream_settings(settings)
    with Publisher(redis_client, stream=s.stream_readings, maxlen=50, batch_size=10) as pub:
        with pytest.raises(InvalidReadingError, match="finite"):
            pub.publish(series_id, 1, float("nan"))
        with pytest.raises(InvalidReadingError, match="series_id"):
            pub.publish("not valid!", 1, 1.0)
        for n in range(200):
            pub.publish(series_id, n, n * 0.5)
    assert pub.sent == 200
    assert redis_client.xlen(s.stream_readings) < 200  # MAXLEN ~ 50 trims as it goes


def test_durable_subscriber_resumes_where_it_stopped(settings, redis_client):
    s = stream_settings(settings)
    for n in range(5):
        redis_client.xadd(s.stream_anomalies, {"series_id": "a", "timestamp": str(n)})

    def read(limit: int | None) -> list[int]:
        sub = Subscriber(
            redis_client, stream=s.stream_anomalies, start="0", group="audit", consumer="c",
            block_ms=100,
        )  # fmt: skip
        return [e["timestamp"] for e in sub.events(limit=limit, idle_timeout=0.2)]

    assert read(2) == [0, 1]
    assert read(None) == [2, 3, 4]
    assert read(None) == []


def _readings(series_id: str, count: int) -> list[tuple[str, int, float]]:
    return [(series_id, n, n * 0.25) for n in range(count)]


def _as_rows(entries: list[dict[str, str]]) -> list[tuple[str, int, float]]:
    return [(f["series_id"], int(f["timestamp"]), float(f["value"])) for f in entries]


def _auth(settings):
    """The service user's credentials, for a client that connects through the proxy."""
    return {"username": settings.redis_username, "password": settings.redis_password}


def through(settings, port):
    """The service's Redis URL, pointed at the proxy's port instead."""
    return settings.model_copy(update={"redis_port": port}).redis_connection_url()


def test_a_batch_whose_reply_was_lost_is_not_added_twice_on_retry(
    settings, redis_server, redis_client, series_id
):
    s_stream = f"readings-{uuid.uuid4().hex[:10]}"
    readings = _readings(series_id, 1000)
    with ReplyDroppingProxy(redis_server.port, drop={2, 4}) as proxy:
        # redis.Redis(host, port) retries a command 3 times after a connection error.
        client = redis.Redis(port=proxy.port, decode_responses=True, **_auth(settings))
        try:
            with Publisher(client, stream=s_stream, batch_size=200) as pub:
                for row in readings:
                    pub.publish(*row)
        finally:
            client.close()
        assert proxy.dropped == 2
    assert pub.sent == 1000
    assert _as_rows([f for _, f in events(redis_client, s_stream)]) == readings


def test_ingest_cli_survives_lost_replies_without_duplicates(settings, redis_server, redis_client):
    s = stream_settings(settings)
    with ReplyDroppingProxy(redis_server.port, drop={1, 3}) as proxy:
        done = ingest(
            settings, "--redis-url", through(settings, proxy.port),
            "--stream", s.stream_readings, "generate", "--count", "1000", "--series", "4",
            "--batch-size", "200", "--seed", "3",
        )  # fmt: skip
        assert proxy.dropped == 2
    assert done.returncode == 0, done.stderr
    entries = [f for _, f in events(redis_client, s.stream_readings)]
    assert len(entries) == 1000
    assert len({(f["series_id"], f["timestamp"]) for f in entries}) == 1000


def test_an_unconfirmed_batch_is_named_and_resent_once_before_newer_readings(
    settings, redis_server, redis_client, series_id
):
    stream = f"readings-{uuid.uuid4().hex[:10]}"
    readings = _readings(series_id, 500)
    # Cached beforehand, so the second large request is batch 2 (not a NOSCRIPT round).
    redis_client.script_load(
        resources.files("detector").joinpath("scripts/publish_batch.lua").read_text()
    )
    with ReplyDroppingProxy(redis_server.port, drop={2}) as proxy:
        client = redis.Redis(
            port=proxy.port, decode_responses=True, retry=Retry(NoBackoff(), 0), **_auth(settings)
        )
        try:
            pub = Publisher(client, stream=stream, batch_size=200, retries=0)
            with pytest.raises(UnconfirmedBatchError, match=r"batch 2 .*\(200 readings\)") as err:
                for row in readings[:400]:
                    pub.publish(*row)
            assert err.value.confirmed == 200 == pub.sent
            assert redis_client.xlen(stream) == 400  # it was added; only the reply was lost
            for row in readings[400:]:
                pub.publish(*row)
            pub.close()
        finally:
            client.close()
    assert pub.sent == 500 and pub.resent == 1
    assert _as_rows([f for _, f in events(redis_client, stream)]) == readings
    assert not redis_client.exists(pub.key)  # a clean close drops the producer's record


def test_two_publishers_sharing_a_producer_id_are_refused(redis_client, series_id):
    stream = f"readings-{uuid.uuid4().hex[:10]}"
    first = Publisher(redis_client, stream=stream, producer_id="shared", batch_size=2)
    second = Publisher(redis_client, stream=stream, producer_id="shared", batch_size=3)
    for n in range(4):
        first.publish(series_id, n, 1.0)  # batches 1 and 2
    with pytest.raises(redis.exceptions.ResponseError, match="shared by two publishers"):
        for n in range(3):
            second.publish(series_id, n, 2.0)  # its batch 1
    assert redis_client.xlen(stream) == 4
    assert 0 < redis_client.ttl(first.key) <= 86_400
