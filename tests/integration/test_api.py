"""The REST contract of docs/api.md, against the real service (uvicorn, Redis, PostgreSQL),
on one Redis and on a Redis Cluster of three masters and three replicas."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from tests.support.api import VALUES, fit


@pytest.fixture(params=["redis", "cluster"])
def client(request: pytest.FixtureRequest, client: httpx.Client) -> httpx.Client:
    """The service on one Redis (the session's ``client``), then on the cluster."""
    if request.param == "cluster":
        return request.getfixturevalue("cluster_client")
    return client


# ---------------------------------------------------------------- fit


def test_fit_answers_version_and_points(client, series_id):
    body = fit(client, series_id)
    assert body["series_id"] == series_id
    assert body["version"] == "v1.0.0"
    assert body["points_used"] == 10
    assert body["mean"] == pytest.approx(np.mean(VALUES))
    assert body["std"] == pytest.approx(np.std(VALUES))
    assert fit(client, series_id)["version"] == "v2.0.0"  # same data: still a new version
    assert fit(client, series_id)["version"] == "v3.0.0"


def test_fit_accepts_unsorted_points_and_stores_them_sorted(client, series_id, pg):
    response = client.post(
        f"/fit/{series_id}", json={"timestamps": [30, 10, 20, 40.0], "values": [3, 1, 2, 4]}
    )
    assert response.status_code == 200, response.text
    rows = pg.execute(
        "SELECT p.ts, p.value FROM training_point_rows p"
        " JOIN model_versions m ON m.id = p.model_id "
        "WHERE m.series_id = %s ORDER BY p.ts",
        (series_id,),
    ).fetchall()
    assert rows == [(10, 1.0), (20, 2.0), (30, 3.0), (40, 4.0)]


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"timestamps": [1, 2], "values": [1, 2]}, "at least 3"),
        ({"timestamps": [1, 2, 3], "values": [1, 2]}, "same length"),
        ({"timestamps": [1, 2, 3], "values": [5, 5, 5]}, "constant"),
        ({"timestamps": [1, 1, 3], "values": [1, 2, 3]}, "unique"),
        ({"timestamps": [1, 2.5, 3], "values": [1, 2, 3]}, "non-negative integers"),
        ({"timestamps": [1, -2, 3], "values": [1, 2, 3]}, "non-negative integers"),
        ({"timestamps": [1, 2, 3], "values": [1, 2, 3], "sigma": 0}, "greater than 0"),
        ({"timestamps": [1, 2, 3], "values": [1, 2, 3], "direction": "up"}, "above"),
    ],
)
def test_fit_rules_are_422_saying_why(client, series_id, body, needle):
    response = client.post(f"/fit/{series_id}", json=body)
    assert response.status_code == 422
    assert needle in response.text
    assert client.get(f"/models/{series_id}").status_code == 404  # nothing written


@pytest.mark.parametrize(
    "raw",
    [
        '{"timestamps": [1, 2, 3], "values": [1, NaN, 3]}',
        '{"timestamps": [1, 2, 3], "values": [1, Infinity, 3]}',
        '{"timestamps": ["1", "2", "3"], "values": [1, 2, 3]}',
        '{"timestamps": [1, 2, 3], "values": [1, "2", 3]}',
        '{"timestamps": [1, 2, 3], "values": [true, 2, 3]}',
        '{"timestamps": [1, 2, 3]}',
        '{"timestamps": [1, 2, 3], "values": [1, 2, 3]',
        "[]",
        "",
    ],
)
def test_fit_wrong_types_are_422(client, series_id, raw):
    response = client.post(
        f"/fit/{series_id}", content=raw, headers={"content-type": "application/json"}
    )
    assert response.status_code == 422, response.text
    assert "detail" in response.json()


def test_unknown_fields_are_named(client, series_id):
    response = client.post(
        f"/fit/{series_id}", json={"timestamps": [1, 2, 3], "values": [1, 2, 3], "sigmaa": 4}
    )
    assert response.status_code == 422
    assert "sigmaa" in response.text


def test_sigma_and_direction_are_stored_with_the_version(client, series_id):
    fit(client, series_id, sigma=1.5, direction="both")
    fit(client, series_id)
    versions = client.get(f"/models/{series_id}").json()["versions"]
    assert [(v["version"], v["sigma"], v["direction"]) for v in versions] == [
        ("v1.0.0", 1.5, "both"),
        ("v2.0.0", 3.0, "above"),
    ]
    low = {"timestamp": 1, "value": 5.0}
    assert client.post(f"/predict/{series_id}?version=1", json=low).json()["anomaly"] is True
    assert client.post(f"/predict/{series_id}", json=low).json()["anomaly"] is False


# ---------------------------------------------------------------- predict


def test_predict_answers_exactly_two_keys(client, series_id):
    body = fit(client, series_id)
    upper = body["mean"] + 3 * body["std"]
    for ts in ("1641013200", 1641013200):
        high = client.post(f"/predict/{series_id}", json={"timestamp": ts, "value": upper + 0.01})
        assert high.status_code == 200
        assert high.json() == {"anomaly": True, "model_version": "v1.0.0"}
    normal = client.post(f"/predict/{series_id}", json={"timestamp": 1, "value": 10.0})
    assert normal.json() == {"anomaly": False, "model_version": "v1.0.0"}
    low = client.post(f"/predict/{series_id}", json={"timestamp": 1, "value": -1e6})
    assert low.json()["anomaly"] is False  # default direction is "above"


@pytest.mark.parametrize(
    "body",
    [
        {"timestamp": "1.0", "value": 1},
        {"timestamp": "+1", "value": 1},
        {"timestamp": " 1", "value": 1},
        {"timestamp": "-1", "value": 1},
        {"timestamp": -1, "value": 1},
        {"timestamp": 1.5, "value": 1},
        {"timestamp": -1.0, "value": 1},
        {"timestamp": 1e19, "value": 1},  # an integral float beyond the largest timestamp
        {"timestamp": 2**62 + 1, "value": 1},
        {"timestamp": 1, "value": "1"},
        {"timestamp": 1, "value": True},
        {"timestamp": 1},
        {"timestamp": 1, "value": 1, "extra": 2},
    ],
)
def test_bad_predict_bodies_are_422_even_for_unknown_series(client, series_id, body):
    response = client.post(f"/predict/{series_id}", json=body)
    assert response.status_code == 422, response.text


def test_predict_checks_the_body_then_the_id_then_the_version(client):
    bad_body = client.post("/predict/a*b", params={"version": "v0"}, json={"timestamp": 1})
    assert bad_body.status_code == 422
    assert bad_body.json()["detail"][0]["loc"] == ["body", "value"]
    point = {"timestamp": 1, "value": 1}
    bad_id = client.post("/predict/a*b", params={"version": "v0"}, json=point)
    assert bad_id.status_code == 422 and "1-128 characters" in bad_id.json()["detail"]
    bad_version = client.post("/predict/never-fitted", params={"version": "v0"}, json=point)
    assert bad_version.status_code == 422 and "v3.0.0" in bad_version.json()["detail"]
    not_json = client.post(
        "/predict/never-fitted", content=b"{", headers={"content-type": "application/json"}
    )
    assert not_json.status_code == 422 and not_json.json()["detail"][0]["loc"][0] == "body"


def test_predict_declares_its_parameters_as_the_batch_route_does(client):
    paths = client.get("/openapi.json").json()["paths"]
    single = paths["/predict/{series_id}"]["post"]
    assert single["parameters"] == paths["/predict/{series_id}/batch"]["post"]["parameters"]
    assert [p["name"] for p in single["parameters"]] == ["series_id", "version"]
    assert single["requestBody"]["required"] is True


def test_versions_by_any_spelling(client, series_id):
    fit(client, series_id)
    fit(client, series_id)
    point = {"timestamp": 1, "value": 10}
    for spelling, expected in [
        ("v1.0.0", "v1.0.0"),
        ("v1", "v1.0.0"),
        ("1", "v1.0.0"),
        ("2", "v2.0.0"),
        ("", "v2.0.0"),
    ]:
        response = client.post(f"/predict/{series_id}", params={"version": spelling}, json=point)
        assert response.status_code == 200, (spelling, response.text)
        assert response.json()["model_version"] == expected


@pytest.mark.parametrize("version", ["0", "v0", "v0.0.0", "-1", "abc", "v1.0"])
def test_malformed_versions_are_422_before_any_lookup(client, version):
    response = client.post(
        "/predict/never-fitted", params={"version": version}, json={"timestamp": 1, "value": 1}
    )
    assert response.status_code == 422


def test_unknown_series_and_versions_are_404_naming_them(client, series_id):
    point = {"timestamp": 1, "value": 1}
    response = client.post(f"/predict/{series_id}", json=point)
    assert response.status_code == 404 and series_id in response.json()["detail"]
    fit(client, series_id)
    for version in ("v7", "v1.1.0"):
        response = client.post(f"/predict/{series_id}", params={"version": version}, json=point)
        assert response.status_code == 404
        detail = response.json()["detail"]
        assert series_id in detail and version.lstrip("v")[:1] in detail


@pytest.mark.parametrize("bad", ["a%20b", "%C3%A9", "x" * 129, "a*b", "..", "."])
def test_bad_series_ids_are_422_stating_the_rule(client, bad):
    response = client.post(f"/fit/{bad}", json={"timestamps": [1, 2, 3], "values": [1, 2, 3]})
    if bad in (".", ".."):  # clients normalise these paths away; nothing may be stored
        assert response.status_code in (404, 405, 422)
        return
    assert response.status_code == 422
    assert "1-128 characters" in response.json()["detail"]


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("OPTIONS", "/series/s1/feedback", {"GET", "POST"}),  # two routes share the path
        ("DELETE", "/series/s1/feedback", {"GET", "POST"}),
        ("PUT", "/fit/s1", {"POST"}),
        ("GET", "/predict/s1", {"POST"}),
    ],
)
def test_a_405_allows_every_method_the_path_serves(client, method, path, allowed):
    """``Allow`` names every method of the path, not only the first route's that matched
    (was ``Allow: POST`` on a path that also serves GET)."""
    response = client.request(method, path)
    assert response.status_code == 405
    assert {m.strip() for m in response.headers["allow"].split(",")} == allowed
    assert response.json()["detail"] == "Method Not Allowed"


def test_key_separators_cannot_reach_another_series(client, series_id):
    fit(client, series_id)
    for other in (f"{series_id}:latest", f"{series_id}:1", f"{series_id}:"):
        response = client.post(f"/predict/{other}", json={"timestamp": 1, "value": 1})
        assert response.status_code == 404
    assert fit(client, f"{series_id}:latest")["version"] == "v1.0.0"
    assert fit(client, series_id)["version"] == "v2.0.0"


# ---------------------------------------------------------------- batch, models, plot


def test_batch_predict_scores_every_point(client, series_id):
    body = fit(client, series_id, direction="both")
    values = [10.0, 100.0, -100.0, 10.5]
    response = client.post(
        f"/predict/{series_id}/batch", json={"timestamps": [1, 2, 3, 4], "values": values}
    )
    assert response.status_code == 200, response.text
    out = response.json()
    assert out["anomaly"] == [False, True, True, False]
    assert out["anomalies"] == 2
    assert out["score"] == pytest.approx([(v - body["mean"]) / body["std"] for v in values])
    assert out["lower"] == pytest.approx(body["mean"] - 3 * body["std"])
    assert out["upper"] == pytest.approx(body["mean"] + 3 * body["std"])
    # Every point explained: expected value, the test, a 0–100 severity (50 at the bound).
    assert out["expected"] == body["mean"] and out["test"] == "threshold"
    ratios = [abs(v - body["mean"]) / (3 * body["std"]) for v in values]
    assert out["severity"] == pytest.approx([100 * r / (1 + r) for r in ratios], abs=0.05)
    assert all(s > 50 for s, a in zip(out["severity"], out["anomaly"], strict=True) if a)
    bad = client.post(f"/predict/{series_id}/batch", json={"timestamps": [1], "values": [1, 2]})
    assert bad.status_code == 422


def test_the_smallest_k_gives_severities_of_100_not_null(client, series_id):
    """k = 5e-324 (the smallest positive double) makes |z|/k infinite: severity 100, where
    r / (1 + r) was NaN, written as null (found by schemathesis' coverage phase)."""
    fit(client, series_id, sigma=5e-324, kind="static")
    out = client.post(
        f"/predict/{series_id}/batch", json={"timestamps": [1, 2], "values": [0.0, 1e6]}
    ).json()
    assert out["severity"] == [100.0, 100.0] and out["anomaly"] == [False, True]


def test_scores_far_beyond_a_tight_baseline_are_finite(client, series_id):
    """(1e308 − μ)/σ with σ = 8e-151 overflows to ±inf, which JSON cannot carry (it came out
    null): every kind's score is the signed z clipped to ±1e9, as the stateful kinds' were."""
    body = {"timestamps": [1, 2, 3], "values": [0.0, 1e-150, 2e-150], "kind": "static"}
    assert client.post(f"/fit/{series_id}", json=body).status_code == 200
    points = {"timestamps": [4, 5, 6], "values": [1e308, -1e308, 1e-150]}
    out = client.post(f"/predict/{series_id}/batch", json=points).json()
    assert out["score"] == [1e9, -1e9, 0.0]
    events = client.post(f"/backfill/{series_id}", json=points).json()["events"]
    assert [e["score"] for e in events] == [1e9]


def test_models_listing_pages_by_series_id(client, series_id):
    ids = [f"{series_id}-{i}" for i in range(5)]
    for sid in ids:
        fit(client, sid)
    fit(client, ids[0])
    seen, url = [], f"/models?limit=2&after={series_id}"
    while url and len(seen) < 5:
        page = client.get(url).json()
        seen.extend(page["items"])
        url = page["next"]
    assert [item["series_id"] for item in seen[:5]] == ids
    assert seen[0]["latest_version"] == "v2.0.0" and seen[0]["versions"] == 2
    assert client.get("/models?limit=0").status_code == 422
    assert client.get("/models?limit=1001").status_code == 422


def test_models_of_a_series_oldest_first(client, series_id):
    fit(client, series_id)
    fit(client, series_id, sigma=4)
    body = client.get(f"/models/{series_id}").json()
    assert body["series_id"] == series_id
    assert [v["version"] for v in body["versions"]] == ["v1.0.0", "v2.0.0"]
    first = body["versions"][0]
    assert set(first) == {
        "version",
        "mean",
        "std",
        "sigma",
        "direction",
        "points_used",
        "created_at",
        "mlflow_run_id",
        "kind",  # beside the contract's keys: which detector kind the version is
    }
    assert client.get("/models/nope-never").status_code == 404


def test_plot_is_a_png(client, series_id):
    fit(client, series_id)
    response = client.get("/plot", params={"series_id": series_id})
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert response.content.startswith(b"\x89PNG\r\n\x1a\n")
    assert client.get("/plot", params={"series_id": series_id, "version": "v1"}).status_code == 200
    assert client.get("/plot", params={"series_id": series_id, "version": "v9"}).status_code == 404
    assert client.get("/plot", params={"series_id": "unknown-series"}).status_code == 404
    assert client.get("/plot", params={"series_id": "../../etc/passwd"}).status_code == 422


def test_plot_of_timestamps_beyond_year_9999_is_a_png(client, series_id):
    """Timestamps go up to 2^62 s; matplotlib's dates stop at year 9999 (found by schemathesis)."""
    body = {"timestamps": [3321, 70_876_291, 2**62 - 1], "values": [1.0, 2.0, 4.0]}
    assert client.post(f"/fit/{series_id}", json=body).status_code == 200
    answer = client.get("/plot", params={"series_id": series_id})
    assert answer.status_code == 200 and answer.content.startswith(b"\x89PNG")


def test_plot_of_a_seasonal_version_draws_the_bounds_its_stream_uses(client, series_id):
    """The expected value follows the learned daily profile; its bounds are the point test's."""
    rng = np.random.default_rng(7)
    ts = 1_700_000_000 + 300 * np.arange(3 * 288)
    hours = (ts // 3600) % 24
    values = 100.0 + 20.0 * (hours == 2) + rng.normal(0.0, 1.0, ts.size)
    body = {"timestamps": ts.tolist(), "values": values.round(6).tolist(), "kind": "seasonal"}
    assert client.post(f"/fit/{series_id}", json=body).status_code == 200
    answer = client.get("/plot", params={"series_id": series_id})
    assert answer.status_code == 200 and answer.content.startswith(b"\x89PNG")
    static = client.get("/plot", params={"series_id": series_id, "version": "v1"})
    assert static.content == answer.content  # the same version, the same drawing
