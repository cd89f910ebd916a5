"""GET /events (Server-Sent Events of anomalies) and GET /anomalies (history in PostgreSQL)."""

from __future__ import annotations

import json

import httpx

from tests.support.streams import fit, publish, run_worker, stream_settings


def sse_events(response: httpx.Response, wanted: int) -> list[tuple[str, dict]]:
    """The first ``wanted`` (id, data) anomaly events of an open SSE response."""
    found: list[tuple[str, dict]] = []
    event_id = ""
    for line in response.iter_lines():
        if line.startswith("id: "):
            event_id = line[4:]
        elif line.startswith("data: "):
            found.append((event_id, json.loads(line[6:])))
            if len(found) == wanted:
                return found
    return found


def test_events_stream_new_anomalies_filtered_by_series(api_url, settings, redis_client, series_id):
    stream = settings.stream_anomalies  # the API under test uses the default stream names
    redis_client.xadd(stream, {"series_id": series_id, "timestamp": "1", "value": "0"})  # past
    timeout = httpx.Timeout(30, read=15)
    with (
        httpx.Client(base_url=api_url, timeout=timeout) as http,
        http.stream("GET", "/events", params={"series_id": series_id}) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        redis_client.xadd(stream, {"series_id": "someone-else", "timestamp": "2", "value": "0"})
        first = redis_client.xadd(
            stream, {"series_id": series_id, "timestamp": "3", "value": "131.5", "score": "3.15"}
        )
        ((event_id, data),) = sse_events(response, 1)
    assert event_id == first
    assert data == {"series_id": series_id, "timestamp": 3, "value": 131.5, "score": 3.15}

    # A reconnecting browser sends Last-Event-ID and gets what it missed.
    second = redis_client.xadd(stream, {"series_id": series_id, "timestamp": "4", "value": "1"})
    with (
        httpx.Client(base_url=api_url, timeout=timeout) as http,
        http.stream(
            "GET", "/events", params={"series_id": series_id}, headers={"Last-Event-ID": first}
        ) as response,
    ):
        assert [i for i, _ in sse_events(response, 1)] == [second]


def test_an_empty_last_event_id_is_no_id(api_url, redis_client, settings, series_id):
    """An empty ``Last-Event-ID`` (an SSE client whose last id was reset) or ``last_id`` says
    no position: the other one, else now, as without it (was a 422)."""
    stream = settings.stream_anomalies
    first = redis_client.xadd(stream, {"series_id": series_id, "timestamp": "1", "value": "0"})
    second = redis_client.xadd(stream, {"series_id": series_id, "timestamp": "2", "value": "0"})
    timeout = httpx.Timeout(30, read=15)
    with httpx.Client(base_url=api_url, timeout=timeout) as http:
        params = {"series_id": series_id, "last_id": first}
        with http.stream("GET", "/events", params=params, headers={"Last-Event-ID": ""}) as r:
            assert r.status_code == 200
            assert [i for i, _ in sse_events(r, 1)] == [second]
        params = {"series_id": series_id, "last_id": ""}
        with http.stream("GET", "/events", params=params, headers={"Last-Event-ID": ""}) as r:
            assert r.status_code == 200
            third = redis_client.xadd(stream, {"series_id": series_id, "timestamp": "3"})
            assert [i for i, _ in sse_events(r, 1)] == [third]  # from now


def test_events_reject_bad_parameters(client):
    assert client.get("/events", params={"series_id": "no spaces"}).status_code == 422
    answer = client.get("/events", headers={"Last-Event-ID": "yesterday"})
    assert answer.status_code == 422
    assert "Last-Event-ID" in answer.json()["detail"]


def test_anomalies_history_from_postgres(settings, client, redis_client, series_id):
    s = stream_settings(settings)
    fit(client, series_id, [90.0, 110.0] * 5)  # bound 130
    rows = [(series_id, 1000 + n, 200.0 + n if n % 2 else 100.0) for n in range(20)]
    publish(redis_client, s.stream_readings, rows)
    run_worker(s)

    answer = client.get("/anomalies", params={"series_id": series_id})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["series_id"] == series_id
    items = body["anomalies"]
    assert [a["timestamp"] for a in items] == [1000 + n for n in range(1, 20, 2)]
    first = items[0]
    assert first["value"] == 201.0 and first["model_version"] == "v1.0.0"
    assert (first["mean"], first["std"], first["lower"], first["upper"]) == (100, 10, 70, 130)
    assert first["score"] == 10.1 and first["source"] == "stream" and first["source_id"]

    window = client.get(
        "/anomalies", params={"series_id": series_id, "since": 1005, "until": 1011, "limit": 2}
    ).json()["anomalies"]
    assert [a["timestamp"] for a in window] == [1005, 1007]
    empty = client.get("/anomalies", params={"series_id": "never-seen-series"})
    assert empty.status_code == 200 and empty.json()["anomalies"] == []


def test_plot_draws_detections_of_any_finite_value_and_time(
    settings, client, redis_client, series_id
):
    """Readings at ±1e308 and at the last timestamp taken (2^62) are valid anomalies; drawn,
    they made the frame's span overflow a float and matplotlib's transform singular (a 500)."""
    s = stream_settings(settings)
    body = {"timestamps": list(range(10)), "values": [90.0, 110.0] * 5}
    answer = client.post(f"/fit/{series_id}", json={**body, "direction": "both", "kind": "static"})
    assert answer.status_code == 200, answer.text
    extreme = [(series_id, 1000, 1e308), (series_id, 1001, -1e308), (series_id, 2**62, 300.0)]
    publish(redis_client, s.stream_readings, extreme)
    run_worker(s)
    history = client.get("/anomalies", params={"series_id": series_id}).json()["anomalies"]
    assert sorted(a["value"] for a in history) == [-1e308, 300.0, 1e308]
    overlaid = client.get("/plot", params={"series_id": series_id, "anomalies": "true"})
    assert overlaid.status_code == 200 and overlaid.content.startswith(b"\x89PNG")


def test_anomalies_history_rejects_bad_parameters(client):
    for params in (
        {},
        {"series_id": "bad id"},
        {"series_id": "ok", "limit": 0},
        {"series_id": "ok", "limit": 10_001},
        {"series_id": "ok", "since": -1},
        {"series_id": "ok", "until": "tomorrow"},
    ):
        answer = client.get("/anomalies", params=params)
        assert answer.status_code == 422, params
        assert "detail" in answer.json()


def test_plot_overlays_the_anomalies_detected_on_the_stream(
    settings, client, redis_client, series_id
):
    s = stream_settings(settings)
    fit(client, series_id, [90.0, 110.0] * 5)
    publish(redis_client, s.stream_readings, [(series_id, 1000 + n, 300.0) for n in range(5)])
    run_worker(s)
    plain = client.get("/plot", params={"series_id": series_id})
    overlaid = client.get("/plot", params={"series_id": series_id, "anomalies": "true"})
    assert overlaid.status_code == 200 and overlaid.content.startswith(b"\x89PNG")
    assert overlaid.content != plain.content  # the five detections are drawn
