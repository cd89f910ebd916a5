"""Optional API keys: off by default; write and read keys apart; 401 and 403."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from embedded.processes import free_port
from tests.support.services import ROOT, service_env, start_api, wait_serving

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


@pytest.mark.parametrize("keys", [" , ", "   "])
def test_keys_of_only_blanks_and_commas_are_a_startup_error(settings, keys):
    # Such a value was meant to set keys: serving an open API instead would hide the mistake.
    result = subprocess.run(
        [sys.executable, "-m", "api", "--port", str(free_port())],
        env=service_env(settings, API_KEYS=keys),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "API_KEYS" in result.stderr and "no key" in result.stderr, result.stderr[-2000:]
    read_only = subprocess.run(
        [sys.executable, "-m", "api", "--port", str(free_port())],
        env=service_env(settings, API_READ_KEYS=keys),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert read_only.returncode != 0 and "API_READ_KEYS" in read_only.stderr


def serve_and_read_stderr(settings, host, **env):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "api", "--host", host, "--port", str(port)],
        env=service_env(settings, **env),
        cwd=ROOT,
        stderr=subprocess.PIPE,
    )
    try:
        wait_serving(f"http://127.0.0.1:{port}", proc)
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=30)
    return stderr.decode(errors="replace")


def test_serving_other_hosts_without_keys_warns(settings):
    stderr = serve_and_read_stderr(settings, "0.0.0.0")
    assert "WARNING" in stderr and "without API keys" in stderr, stderr[-2000:]
    assert "without API keys" not in serve_and_read_stderr(settings, "127.0.0.1")
    assert "without API keys" not in serve_and_read_stderr(settings, "0.0.0.0", API_KEYS="k")


@pytest.mark.parametrize("sigma", [1e308, 101, 0, -1])
def test_absurd_sigma_is_a_422_that_says_the_bound(client, series_id, sigma):
    response = client.post(f"/fit/{series_id}", json={**FIT, "sigma": sigma})
    assert response.status_code == 422, response.text
    assert "sigma" in str(response.json()["detail"])
    assert client.get(f"/models/{series_id}").status_code == 404


def test_sigma_bound_is_in_the_schema_and_the_bound_itself_fits(client, series_id):
    fit = client.get("/openapi.json").json()["paths"]["/fit/{series_id}"]["post"]
    schema = fit["requestBody"]["content"]["application/json"]["schema"]
    (sigma,) = [
        option
        for option in schema["properties"]["sigma"]["anyOf"]
        if option.get("type") == "number"
    ]
    assert sigma["exclusiveMinimum"] == 0 and sigma["maximum"] == 100
    assert client.post(f"/fit/{series_id}", json={**FIT, "sigma": 100}).status_code == 200
