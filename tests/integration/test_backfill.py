"""Backfill against real Redis, PostgreSQL and the API: a history scored through the stream
pipeline gives what live streaming of the same readings gives, and touches nothing live."""

from __future__ import annotations

import asyncio
import csv
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis

from detector.redis_keys import backfill_namespace, episode_key, state_key
from detector.settings import Settings
from detector.state.series import read_state
from detector.store.connections import redis_client as async_redis_client
from tests.support.services import ROOT, service_env
from tests.support.streams import events, publish, run_worker, stream_settings

START = 1_700_000_000
STEP = 300
FIT_POINTS = 600
# What may differ between a live event and its backfill twin: the ids (entry ids against
# backfill/<job>/<index>), the episode ids derived from them, when it was detected, the flag.
IDS = {"source_id", "episode_id", "detected_at", "backfill"}
INGEST = [sys.executable, "-m", "ingest"]


def history(n: int, seed: int) -> list[float]:
    """A daily wave with noise and a few spikes and a level shift: every test of the kinds."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    values = 100 + 10 * np.sin(2 * np.pi * t * STEP / 86_400) + rng.normal(0, 1, n)
    values[rng.choice(n, 6, replace=False)] += 40
    values[n // 2 : n // 2 + 30] += 25
    return [round(float(v), 4) for v in values]


def fit(client: httpx.Client, series_id: str, kind: str) -> None:
    answer = client.post(
        f"/fit/{series_id}",
        json={
            "timestamps": [START + STEP * i for i in range(FIT_POINTS)],
            "values": history(FIT_POINTS, 1),
            "kind": kind,
        },
    )
    assert answer.status_code == 200, answer.text


def comparable(fields: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in fields.items() if k not in IDS}


def onsets(found: list[dict[str, str]]) -> list[str]:
    """Per event, the timestamp of its episode's opener: episodes compared by membership."""
    opener = {f["source_id"]: f["timestamp"] for f in found if f.get("onset") == "1"}
    return [opener.get(f.get("episode_id", ""), "?") for f in found]


@pytest.mark.parametrize("kind", ["seasonal", "static", "multiscale"])
def test_a_backfilled_history_gives_the_events_of_live_streaming_and_touches_nothing_live(
    settings: Settings,
    client: httpx.Client,
    redis_client: redis.Redis,
    tmp_path: Path,
    kind: str,
) -> None:
    series_id = f"bf-{uuid.uuid4().hex[:10]}"
    fit(client, series_id, kind)
    values = history(3000, 2)
    rows = [(series_id, START + STEP * (FIT_POINTS + i), v) for i, v in enumerate(values)]

    live = stream_settings(settings)
    publish(redis_client, live.stream_readings, rows)
    run_worker(live)
    streamed = [f for _, f in events(redis_client, live.stream_anomalies)]
    assert len(streamed) >= 5  # the spikes at least
    live_state_before = redis_client.dump(state_key(series_id))
    live_episode_before = redis_client.hgetall(episode_key(series_id))

    path = tmp_path / "history.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["timestamp", "value"])
        writer.writerows((t, v) for _, t, v in rows)
    stream = f"anomalies:backfill:{uuid.uuid4().hex[:8]}"
    job = f"job-{uuid.uuid4().hex[:8]}"
    command = [*INGEST, "--stream", stream, "backfill", "--csv", str(path)]
    done = subprocess.run(
        [*command, "--series-id", series_id, "--job", job],
        capture_output=True,
        text=True,
        env=service_env(settings, BACKFILL_CHUNK="700"),  # chunks end mid-history
        cwd=ROOT,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert f"backfill {job}: 3000 readings scored" in done.stderr
    backfilled = [f for _, f in events(redis_client, stream)]

    assert [comparable(f) for f in backfilled] == [comparable(f) for f in streamed]
    assert onsets(backfilled) == onsets(streamed)  # the same episodes
    assert {f["backfill"] for f in backfilled} == {job}
    assert [f["source_id"] for f in backfilled] == [
        f"backfill/{job}/{(int(f['timestamp']) - START) // STEP - FIT_POINTS}" for f in backfilled
    ]
    # Live state and episodes untouched; the job's own are apart, and expire.
    assert redis_client.dump(state_key(series_id)) == live_state_before
    assert redis_client.hgetall(episode_key(series_id)) == live_episode_before
    namespace = backfill_namespace(job)
    if kind != "static":
        ttl = redis_client.ttl(state_key(series_id, namespace))
        assert 0 < ttl <= settings.backfill_state_ttl_seconds
    # The history keeps them apart: live by default, the backfill's when asked.
    live_rows = client.get("/anomalies", params={"series_id": series_id, "limit": 10_000}).json()
    assert {a["source_id"] for a in live_rows["anomalies"]} == {f["source_id"] for f in streamed}
    asked = client.get(
        "/anomalies", params={"series_id": series_id, "limit": 10_000, "source": "backfill"}
    ).json()
    assert {a["source_id"] for a in asked["anomalies"]} == {f["source_id"] for f in backfilled}


def test_rest_backfill_in_chunks_equals_one_call_and_reports_its_job(
    settings: Settings, client: httpx.Client
) -> None:
    series_id = f"bf-{uuid.uuid4().hex[:10]}"
    fit(client, series_id, "seasonal")
    values = history(2000, 3)
    ts = [START + STEP * (FIT_POINTS + i) for i in range(len(values))]

    whole = client.post(f"/backfill/{series_id}", json={"timestamps": ts, "values": values})
    assert whole.status_code == 200, whole.text
    one = whole.json()
    assert one["scored"] == 2000 and one["next_start"] == 2000 and one["start"] == 0
    assert one["anomalies"] == len(one["events"]) > 0
    assert one["episodes_opened"] == sum(e["onset"] == "1" for e in one["events"])

    parts: list[dict[str, Any]] = []
    job, start = None, 0
    for lo in range(0, 2000, 600):
        answer = client.post(
            f"/backfill/{series_id}",
            params={"start": start, **({"job": job} if job else {})},
            json={"timestamps": ts[lo : lo + 600], "values": values[lo : lo + 600]},
        )
        assert answer.status_code == 200, answer.text
        body = answer.json()
        job, start = body["job"], body["next_start"]
        parts += body["events"]
    assert job != one["job"] and start == 2000

    def strip(e: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in e.items() if k not in IDS}

    assert [strip(e) for e in parts] == [strip(e) for e in one["events"]]
    assert [e["source_id"].rsplit("/", 1)[1] for e in parts] == [
        e["source_id"].rsplit("/", 1)[1] for e in one["events"]
    ]


@pytest.mark.parametrize(
    ("path", "params", "body", "status", "says"),
    [
        ("/backfill/bf-nobody-here", {}, {"timestamps": [1], "values": [1.0]}, 404, "bf-nobody"),
        ("/backfill/{s}", {"job": "bad job!"}, {"timestamps": [1], "values": [1.0]}, 422, "job"),
        ("/backfill/{s}", {"start": -1}, {"timestamps": [1], "values": [1.0]}, 422, "start"),
        # An index a reading's id and its state's bookkeeping could not hold (was a 500).
        ("/backfill/{s}", {"start": 2**70}, {"timestamps": [1], "values": [1.0]}, 422, "start"),
        (
            "/backfill/{s}",
            {"start": 2**53 - 1},
            {"timestamps": [1, 2], "values": [1.0, 2.0]},
            422,
            "2**53",
        ),
        ("/backfill/{s}", {}, {"timestamps": [1, 2], "values": [1.0]}, 422, "same length"),
        ("/backfill/{s}", {}, {"timestamps": [1], "values": ["x"]}, 422, "values"),
    ],
)
def test_bad_backfill_requests_are_refused_with_what_is_wrong(
    client: httpx.Client,
    path: str,
    params: dict[str, Any],
    body: dict[str, Any],
    status: int,
    says: str,
) -> None:
    series_id = f"bf-{uuid.uuid4().hex[:10]}"
    fit(client, series_id, "static")
    answer = client.post(path.format(s=series_id), params=params, json=body)
    assert answer.status_code == status, answer.text
    assert says in answer.text


def test_a_backfill_state_is_kept_under_its_job(settings: Settings, client: httpx.Client) -> None:
    series_id = f"bf-{uuid.uuid4().hex[:10]}"
    fit(client, series_id, "seasonal")
    values = history(100, 4)
    ts = [START + STEP * (FIT_POINTS + i) for i in range(len(values))]
    job = client.post(f"/backfill/{series_id}", json={"timestamps": ts, "values": values}).json()[
        "job"
    ]

    async def states() -> tuple[Any, Any]:
        r = async_redis_client(settings)
        try:
            return await read_state(r, series_id), await read_state(
                r, series_id, backfill_namespace(job)
            )
        finally:
            await r.aclose()

    live, backfilled = asyncio.run(states())
    assert live is None  # never streamed live
    assert backfilled is not None and backfilled.count == 100
