"""The ingest library and CLI: publishing readings and tailing anomaly events, end to end."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import pytest

from ingest.publisher import InvalidReadingError, Publisher
from ingest.subscriber import Subscriber
from tests.support.services import ROOT, service_env
from tests.support.streams import events, fit, run_worker, stream_settings


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
                "SELECT p.ts FROM training_points p JOIN model_versions m ON m.id = p.model_id"
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
