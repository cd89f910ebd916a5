"""Optional API keys: off by default; write and read keys apart; 401 and 403."""

from __future__ import annotations

import httpx
import pytest

from tests.support.services import start_api

FIT = {"timestamps": [1, 2, 3], "values": [1.0, 2.0, 4.0]}
POINT = {"timestamp": 1, "value": 1.0}


@pytest.fixture(scope="module")
def secured(settings):
    proc, url = start_api(settings, API_KEYS="w-key-1,w-key-2", API_READ_KEYS="r-key")
    yield url
    proc.terminate()
    proc.wait(30)


def test_keys_are_off_by_default(client, series_id):
    assert client.post(f"/fit/{series_id}", json=FIT).status_code == 200


def test_no_key_is_401(secured, series_id):
    response = httpx.post(f"{secured}/fit/{series_id}", json=FIT)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert "API key" in response.json()["detail"]
    assert httpx.post(f"{secured}/predict/{series_id}", json=POINT).status_code == 401
    assert httpx.get(f"{secured}/models/{series_id}").status_code == 401
    assert httpx.get(f"{secured}/plot", params={"series_id": series_id}).status_code == 401


def test_wrong_key_is_401_even_with_a_bad_body(secured, series_id):
    response = httpx.post(
        f"{secured}/fit/{series_id}", json={"x": 1}, headers={"X-API-Key": "nope"}
    )
    assert response.status_code == 401


def test_write_key_fits_and_reads(secured, series_id):
    for headers in ({"X-API-Key": "w-key-2"}, {"Authorization": "Bearer w-key-1"}):
        assert (
            httpx.post(f"{secured}/fit/{series_id}", json=FIT, headers=headers).status_code == 200
        )
        assert (
            httpx.post(f"{secured}/predict/{series_id}", json=POINT, headers=headers).status_code
            == 200
        )


def test_read_key_reads_but_cannot_fit(secured, series_id):
    httpx.post(f"{secured}/fit/{series_id}", json=FIT, headers={"X-API-Key": "w-key-1"})
    read = {"X-API-Key": "r-key"}
    response = httpx.post(f"{secured}/fit/{series_id}", json=FIT, headers=read)
    assert response.status_code == 403
    assert "read" in response.json()["detail"]
    assert httpx.post(f"{secured}/predict/{series_id}", json=POINT, headers=read).status_code == 200
    assert httpx.get(f"{secured}/models/{series_id}", headers=read).status_code == 200


def test_health_and_metrics_stay_open(secured):
    assert httpx.get(f"{secured}/healthcheck").status_code == 200
    assert httpx.get(f"{secured}/metrics").status_code == 200
