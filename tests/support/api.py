"""REST helpers shared by the API tests: a fit of a known series, and an API of a test's own."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from detector.settings import Settings
from tests.support.services import start_api

TS = [1_700_000_000 + 60 * i for i in range(10)]
VALUES = [10.0, 11.0, 9.0, 10.5, 9.5, 10.0, 10.2, 9.8, 10.1, 9.9]


def fit(client: httpx.Client, series_id: str, **extra: Any) -> Any:
    body = {"timestamps": TS, "values": VALUES, **extra}
    response = client.post(f"/fit/{series_id}", json=body)
    assert response.status_code == 200, response.text
    return response.json()


@contextmanager
def extra_api(settings: Settings, *, healthy: bool = True, **env: str) -> Iterator[httpx.Client]:
    proc, url = start_api(settings, healthy=healthy, **env)
    try:
        with httpx.Client(base_url=url, timeout=60) as http:
            yield http
    finally:
        proc.terminate()
        proc.wait(30)
