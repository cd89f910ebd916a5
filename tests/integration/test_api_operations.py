"""The REST service's operations side, against the real service: health and metrics, size
limits, concurrency and volume, and the store's guarantees across processes."""

from __future__ import annotations

import concurrent.futures

import httpx
import numpy as np
import pytest

from embedded.processes import free_port
from tests.support.api import TS, VALUES, extra_api, fit

# ---------------------------------------------------------------- health and metrics


def test_healthcheck_counts_series_and_reports_latencies(client, series_id):
    before = client.get("/healthcheck").json()
    fit(client, series_id)
    fit(client, series_id)
    client.post(f"/predict/{series_id}", json={"timestamp": 1, "value": 1})
    after = client.get("/healthcheck").json()
    assert after["series_trained"] == before["series_trained"] + 1
    for key in ("inference_latency_ms", "training_latency_ms"):
        assert set(after[key]) >= {"avg", "p95"}
        assert after[key]["avg"] > 0 and after[key]["p95"] >= after[key]["p50"] > 0


def test_healthcheck_before_any_request_is_zero(settings):
    with extra_api(settings) as http:
        body = http.get("/healthcheck").json()
    assert body["inference_latency_ms"]["avg"] == 0.0
    assert body["training_latency_ms"]["p95"] == 0.0


@pytest.mark.parametrize(
    ("down", "env_key"), [("redis", "REDIS_PORT"), ("postgres", "POSTGRES_PORT")]
)
def test_dependency_down_is_503_naming_it(settings, down, env_key):
    with extra_api(settings, healthy=False, **{env_key: str(free_port())}) as http:
        response = http.get("/healthcheck")
        assert response.status_code == 503
        body = response.json()
        assert down in body["detail"]
        assert body["dependencies"][down] != "ok"
        fit_response = http.post("/fit/s503", json={"timestamps": [1, 2, 3], "values": [1, 2, 3]})
        assert fit_response.status_code == 503
        assert fit_response.json()["dependency"] == down


def test_metrics_exposes_the_seed_names(client, series_id):
    fit(client, series_id)
    client.post(f"/predict/{series_id}", json={"timestamp": 1, "value": 1})
    text = client.get("/metrics").text
    for name in (
        "train_requests_total",
        "predict_requests_total",
        "train_duration_seconds_bucket",
        "predict_duration_seconds_bucket",
        'le="0.0001"',
        "anomalies_detected_total",
        "http_requests_total",
    ):
        assert name in text
    assert series_id not in text  # no per-series labels


def test_predict_is_counted_under_the_labels_the_dashboards_read(client, series_id):
    fit(client, series_id)
    point = {"timestamp": 1, "value": 1}
    client.post(f"/predict/{series_id}", json=point)
    client.post(f"/predict/{series_id}", json=point)
    client.post(f"/predict/{series_id}-none", json=point)  # 404
    text = client.get("/metrics").text

    def value(series: str) -> float:
        (line,) = [line for line in text.splitlines() if line.startswith(series + " ")]
        return float(line.split()[-1])

    route = 'method="POST",route="/predict/{series_id}"'  # labels as exposed: sorted by name
    assert value(f'http_requests_total{{{route},status="200"}}') >= 2
    assert value(f'http_requests_total{{{route},status="404"}}') >= 1
    assert value(f"http_request_duration_seconds_count{{{route}}}") >= 3
    assert value('predict_requests_total{outcome="ok"}') >= 2
    assert value('predict_requests_total{outcome="not_found"}') >= 1
    assert value('predict_duration_seconds_count{kind="single"}') >= 2


# ---------------------------------------------------------------- limits


def test_size_limits_are_413(settings, series_id):
    with extra_api(settings, MAX_BODY_BYTES="2048", MAX_TRAINING_POINTS="50") as http:
        big = {"timestamps": list(range(1000)), "values": [float(i) for i in range(1000)]}
        response = http.post(f"/fit/{series_id}", json=big)
        assert response.status_code == 413
        assert "limit" in response.json()["detail"]
        over = {"timestamps": list(range(60)), "values": [float(i) for i in range(60)]}
        response = http.post(f"/fit/{series_id}", json=over)
        assert response.status_code == 413
        assert "at most 50 points" in response.json()["detail"]

        def chunks():
            for _ in range(10):
                yield b" " * 1000

        response = http.post(
            f"/fit/{series_id}", content=chunks(), headers={"content-type": "application/json"}
        )
        assert response.status_code == 413


# ---------------------------------------------------------------- concurrency and volume


def test_forty_concurrent_fits_get_forty_versions(api_url, series_id):
    def one(_):
        with httpx.Client(base_url=api_url, timeout=60) as http:
            r = http.post(f"/fit/{series_id}", json={"timestamps": TS, "values": VALUES})
            assert r.status_code == 200, r.text
            return r.json()["version"]

    with concurrent.futures.ThreadPoolExecutor(40) as pool:
        versions = list(pool.map(one, range(40)))
    assert sorted(versions) == sorted(f"v{i}.0.0" for i in range(1, 41))


def test_concurrent_predicts_agree(api_url, client, series_id):
    body = fit(client, series_id)
    upper = body["mean"] + 3 * body["std"]
    values = [upper - 1, upper + 1] * 100

    def one(value):
        with httpx.Client(base_url=api_url, timeout=60) as http:
            r = http.post(f"/predict/{series_id}", json={"timestamp": 1, "value": value})
            return r.json()["anomaly"]

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        flags = list(pool.map(one, values))
    assert flags == [v > upper for v in values]


def test_two_hundred_thousand_point_fit(client, series_id):
    rng = np.random.default_rng(1)
    values = rng.normal(50, 5, 200_000)
    ts = (1_600_000_000 + 60 * np.arange(200_000)).tolist()
    response = client.post(f"/fit/{series_id}", json={"timestamps": ts, "values": values.tolist()})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["points_used"] == 200_000
    assert body["std"] == pytest.approx(float(np.std(values)))
    plot = client.get("/plot", params={"series_id": series_id})
    assert plot.status_code == 200 and plot.content.startswith(b"\x89PNG")


# ---------------------------------------------------------------- the store's guarantees


def test_predict_reloads_from_postgres_after_redis_is_flushed(client, series_id, redis_client):
    body = fit(client, series_id)
    fit(client, series_id, sigma=1.0)
    redis_client.flushall()
    point = {"timestamp": 1, "value": body["mean"] + 2 * body["std"]}  # between 1σ and 3σ
    response = client.post(f"/predict/{series_id}", json=point)
    assert response.json() == {"anomaly": True, "model_version": "v2.0.0"}
    response = client.post(f"/predict/{series_id}", params={"version": "1"}, json=point)
    assert response.json() == {"anomaly": False, "model_version": "v1.0.0"}
    assert redis_client.hget(f"model:{{{series_id}}}", "latest") == "2"
    assert fit(client, series_id)["version"] == "v3.0.0"


def test_read_your_writes_across_api_processes(settings, client, series_id):
    fit(client, series_id)
    with extra_api(settings) as other:
        assert (
            other.post(f"/predict/{series_id}", json={"timestamp": 1, "value": 1}).json()[
                "model_version"
            ]
            == "v1.0.0"
        )
        for expected in range(2, 6):
            fit(client, series_id)
            answer = other.post(f"/predict/{series_id}", json={"timestamp": 1, "value": 1})
            assert answer.json()["model_version"] == f"v{expected}.0.0"


def test_a_fit_redis_refuses_leaves_nothing_in_postgres(settings, pg, series_id):
    with extra_api(settings, healthy=False, REDIS_PORT=str(free_port())) as http:
        response = http.post(f"/fit/{series_id}", json={"timestamps": TS, "values": VALUES})
        assert response.status_code == 503
        assert "Redis" in response.json()["detail"]
    assert (
        pg.execute("SELECT count(*) FROM series WHERE series_id = %s", (series_id,)).fetchone()[0]
        == 0
    )
    assert (
        pg.execute(
            "SELECT count(*) FROM model_versions WHERE series_id = %s", (series_id,)
        ).fetchone()[0]
        == 0
    )
