"""GET /plot draws a version from points kept per version, not from a reload of its data."""

from __future__ import annotations

import re

import httpx

from tests.support.streams import fit


def _cache_counts(client: httpx.Client) -> tuple[float, float]:
    text = client.get("/metrics").text

    def sample(result: str) -> float:
        found = re.search(rf'^plot_cache_requests_total{{result="{result}"}} (\S+)$', text, re.M)
        return float(found[1]) if found else 0.0

    return sample("hit"), sample("miss")


def test_the_second_plot_of_a_version_does_not_reload_its_training_points(client, series_id):
    fit(client, series_id, [90.0, 110.0] * 50 + [400.0])
    hits, misses = _cache_counts(client)
    first = client.get("/plot", params={"series_id": series_id})
    again = client.get("/plot", params={"series_id": series_id, "version": "v1"})
    assert first.status_code == again.status_code == 200
    assert first.content.startswith(b"\x89PNG") and again.content == first.content
    assert _cache_counts(client) == (hits + 1, misses + 1)

    fit(client, series_id, [1.0, 2.0, 3.0])  # a new version is drawn from its own points
    newer = client.get("/plot", params={"series_id": series_id})
    assert newer.status_code == 200 and newer.content != first.content
    assert _cache_counts(client) == (hits + 1, misses + 2)
