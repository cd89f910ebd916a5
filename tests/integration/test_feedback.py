"""Feedback end to end: REST feedback on a recorded episode, stored in PostgreSQL, in force on
a running worker within MODEL_REFRESH_SECONDS."""

from __future__ import annotations

import asyncio
import time
import uuid

import httpx
import numpy as np
import psycopg
import pytest
import redis

from detector.feedback import DEFAULT_RULE, Adjustment
from detector.kinds import seasonal as S
from detector.redis_keys import feedback_key
from detector.settings import Settings
from detector.state.series import read_state
from detector.store.connections import redis_client as async_redis_client
from tests.support.streams import events, publish, run_worker_async, stream_settings

START = 1_700_000_000
STEP = 300
FIT_POINTS = 600


def fit_seasonal(client: httpx.Client, series_id: str) -> dict[str, float]:
    import numpy as np

    values = 100.0 + np.random.default_rng(7).normal(0.0, 1.0, FIT_POINTS)
    answer = client.post(
        f"/fit/{series_id}",
        json={
            "timestamps": [START + STEP * i for i in range(FIT_POINTS)],
            "values": [round(float(v), 6) for v in values],
            "kind": "seasonal",
        },
    )
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def readings(series_id: str, first: int, spike_at: int, spike: float, n: int = 40) -> list:
    """Quiet readings at the fit's mean with one spike."""
    return [
        (series_id, START + STEP * (first + i), spike if i == spike_at else 100.0) for i in range(n)
    ]


def series_events(client: redis.Redis, stream: str, series_id: str) -> list[dict[str, str]]:
    return [f for _, f in events(client, stream) if f["series_id"] == series_id]


def test_false_positive_feedback_reaches_a_running_worker(
    settings: Settings, client: httpx.Client, redis_client: redis.Redis, pg: psycopg.Connection
) -> None:
    s = stream_settings(settings, stream_batch_count=50)
    judged, control = (f"fb-{uuid.uuid4().hex[:10]}" for _ in range(2))
    fitted = fit_seasonal(client, judged)
    fit_seasonal(client, control)
    # 9 σ: past the point test's 8, inside the 8 × 1.25 = 10 one false positive makes it.
    spike = fitted["mean"] + 9.0 * fitted["std"]

    async def wait_for(count: int, series_id: str) -> None:
        while len(series_events(redis_client, s.stream_anomalies, series_id)) < count:  # noqa: ASYNC110 (polling Redis)
            await asyncio.sleep(0.02)

    async def scenario() -> None:
        task = asyncio.create_task(run_worker_async(s, burst=False))
        try:
            for series_id in (judged, control):
                publish(redis_client, s.stream_readings, readings(series_id, FIT_POINTS, 10, spike))
            await asyncio.wait_for(wait_for(1, judged), 30)
            await asyncio.wait_for(wait_for(1, control), 30)
            (opener,) = series_events(redis_client, s.stream_anomalies, judged)
            assert opener["test"] == "point" and opener["onset"] == "1"
            # The version's thresholds are in force: the base score is the detector score.
            assert float(opener["base_score"]) == float(opener["detector_score"]) > 1.0
            # The worker records PostgreSQL before it commits the event: the episode is there.
            answer = await asyncio.to_thread(
                client.post,
                f"/anomalies/{opener['episode_id']}/feedback",
                json={"label": "false_positive", "note": "a planned load test"},
            )
            assert answer.status_code == 200, answer.text
            body = answer.json()
            assert body["series_id"] == judged and body["changed"] is True
            assert body["adjustment"] == {
                "point": DEFAULT_RULE.widen,
                "shift": 1.0,
                "divergence": 1.0,
            }
            detail = body["adjustment_detail"]
            level = float(opener["base_score"])
            assert detail["time"] == int(opener["timestamp"])
            assert detail["caps"][0] == pytest.approx(DEFAULT_RULE.margin * level)
            hour = int(opener["timestamp"]) // 3600 % 24
            assert detail["hours"][0][hour] == DEFAULT_RULE.hour_widen
            posted = time.monotonic()
            await asyncio.sleep(s.model_refresh_seconds + 0.5)
            # The same kind of reading again, a day later (past the quiet period).
            later = FIT_POINTS + 300
            for series_id in (judged, control):
                publish(redis_client, s.stream_readings, readings(series_id, later, 10, spike))
            await asyncio.wait_for(wait_for(2, control), 30)
            await asyncio.sleep(0.5)  # the judged series' batch went with the control's
            assert len(series_events(redis_client, s.stream_anomalies, judged)) == 1
            assert time.monotonic() - posted < 30
            # The worker carries the adjustment in the series' state, the API's own.
            reader = async_redis_client(s)
            try:
                state = await read_state(reader, judged)
            finally:
                await reader.aclose()
            assert state is not None and state.state.size == S.ADJUSTED_WIDTH
            carried = S.adjustment_of(state.state)
            assert np.array_equal(carried, Adjustment.from_dict(detail).vector(), equal_nan=True)
        finally:
            task.cancel()
            await asyncio.wait([task], timeout=5)  # its connections closed before the loop ends

    asyncio.run(asyncio.wait_for(scenario(), 90))

    # Stored once, durably; the same feedback again changes nothing.
    (opener,) = series_events(redis_client, s.stream_anomalies, judged)
    again = client.post(
        f"/anomalies/{opener['episode_id']}/feedback",
        json={"label": "false_positive", "note": "a planned load test"},
    )
    assert again.status_code == 200 and again.json()["changed"] is False
    rows = pg.execute(
        "SELECT label, test, model_version, episode_id, episode_ts, base_score FROM feedback"
        " WHERE series_id = %s",
        (judged,),
    ).fetchall()
    assert rows == [
        (
            "false_positive",
            "point",
            1,
            opener["episode_id"],
            int(opener["timestamp"]),
            float(opener["base_score"]),
        )
    ]
    listed = client.get(f"/series/{judged}/feedback").json()
    assert listed["adjustment"]["point"] == DEFAULT_RULE.widen
    assert [f["label"] for f in listed["feedback"]] == ["false_positive"]
    assert listed["feedback"][0]["model_version"] == "v1.0.0"
    # A later judgment of the same episode replaces the label.
    changed = client.post(
        f"/anomalies/{opener['episode_id']}/feedback", json={"label": "true_positive"}
    )
    assert changed.json()["changed"] is True and changed.json()["adjustment"]["point"] == 1.0
    assert redis_client.hget(feedback_key(judged), "point") == "1.0"


def test_missed_ranges_and_refusals(client: httpx.Client, pg: psycopg.Connection) -> None:
    series_id = f"fb-{uuid.uuid4().hex[:10]}"
    fit_seasonal(client, series_id)
    missed = {"label": "missed", "from": START, "to": START + 3600}
    first = client.post(f"/series/{series_id}/feedback", json=missed)
    assert first.status_code == 200, first.text
    assert first.json()["adjustment"] == dict.fromkeys(
        ("point", "shift", "divergence"), DEFAULT_RULE.narrow
    )
    assert client.post(f"/series/{series_id}/feedback", json=missed).json()["changed"] is False
    count = pg.execute("SELECT count(*) FROM feedback WHERE series_id = %s", (series_id,))
    assert count.fetchone() == (1,)

    def refused(path: str, body: object, status: int = 422) -> str:
        answer = client.post(path, json=body)
        assert answer.status_code == status, answer.text
        return str(answer.json()["detail"])

    assert "no episode" in refused("/anomalies/1-0/feedback", {"label": "false_positive"}, 404)
    assert "no model" in refused("/series/fb-nope-x/feedback", missed, 404)
    refused("/anomalies/1-0/feedback", {"label": "wrong"})
    refused("/anomalies/1-0/feedback", {"label": "false_positive", "sneaky": 1})
    assert "POST /series" in refused("/anomalies/1-0/feedback", missed)
    assert "from and to" in refused(
        "/anomalies/1-0/feedback", {"label": "true_positive", "from": 1, "to": 2}
    )
    assert "needs from and to" in refused(f"/series/{series_id}/feedback", {"label": "missed"})
    assert "is after" in refused(
        f"/series/{series_id}/feedback", {"label": "missed", "from": 5, "to": 4}
    )
    assert "judges an episode" in refused(
        f"/series/{series_id}/feedback", {"label": "false_positive", "from": 1, "to": 2}
    )
    refused(f"/series/{series_id}/feedback", {"label": "missed", "from": -1, "to": 2})
    # Timestamps are JSON numbers, as a fit's (was: false taken as 0 and "61" as 61).
    for bad in (False, True, "61", None, 1.5):
        assert "to" in refused(
            f"/series/{series_id}/feedback", {"label": "missed", "from": 0, "to": bad}
        )
    integral = {"label": "missed", "from": START, "to": START + 7200.0}
    assert client.post(f"/series/{series_id}/feedback", json=integral).status_code == 200
    refused("/series/bad id/feedback", missed)
    assert client.get("/series/fb-nope-x/feedback").status_code == 404


@pytest.mark.parametrize("episode_id", ["a b", "x" * 600])
def test_malformed_episode_ids(client: httpx.Client, episode_id: str) -> None:
    answer = client.post(f"/anomalies/{episode_id}/feedback", json={"label": "false_positive"})
    assert answer.status_code == 422
