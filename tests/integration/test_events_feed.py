"""GET /events served from one shared stream reader: connections, the client cap, resuming."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator

import httpx
import pytest

from tests.support.services import start_api

CLIENTS = 60


@pytest.fixture(scope="module")
def feed_api(settings) -> Iterator[str]:
    proc, url = start_api(settings, SSE_MAX_CLIENTS=str(CLIENTS))
    yield url
    proc.terminate()
    proc.wait(30)


async def _next_event(lines, series_id: str) -> tuple[str, dict]:
    event_id = ""
    async for line in lines:
        if line.startswith("id: "):
            event_id = line[4:]
        elif line.startswith("data: "):
            data = json.loads(line[6:])
            if data.get("series_id") == series_id:
                return event_id, data
    raise AssertionError("the stream ended")


async def _connected(lines) -> None:
    async for line in lines:
        if line == ": connected":
            return
    raise AssertionError("the stream ended before it said connected")


def test_sixty_clients_share_one_redis_reader_and_all_get_every_event(
    feed_api, redis_client, settings
):
    series_id = f"feed-{uuid.uuid4().hex[:8]}"
    before = len(redis_client.client_list())

    async def scenario() -> tuple[int, list[str], str]:
        timeout = httpx.Timeout(60, read=30)
        limits = httpx.Limits(max_connections=CLIENTS + 5)
        async with httpx.AsyncClient(base_url=feed_api, timeout=timeout, limits=limits) as http:
            streams = [
                http.stream("GET", "/events", params={"series_id": series_id})
                for _ in range(CLIENTS)
            ]
            responses = [await s.__aenter__() for s in streams]
            try:
                assert all(r.status_code == 200 for r in responses)
                lines = [r.aiter_lines() for r in responses]
                await asyncio.gather(*(_connected(li) for li in lines))
                during = len(redis_client.client_list())
                event = redis_client.xadd(
                    settings.stream_anomalies, {"series_id": series_id, "timestamp": "5"}
                )
                got = await asyncio.wait_for(
                    asyncio.gather(*(_next_event(li, series_id) for li in lines)), 30
                )
                return during, [i for i, _ in got], event
            finally:
                for s in streams:
                    await s.__aexit__(None, None, None)

    during, ids, event = asyncio.run(scenario())
    assert during - before <= 2, f"{CLIENTS} clients took {during - before} Redis connections"
    assert ids == [event] * CLIENTS


def test_clients_beyond_the_cap_get_503(feed_api):
    async def scenario() -> httpx.Response:
        limits = httpx.Limits(max_connections=CLIENTS + 5)
        async with httpx.AsyncClient(base_url=feed_api, timeout=60, limits=limits) as http:
            streams = [http.stream("GET", "/events") for _ in range(CLIENTS)]
            responses = [await s.__aenter__() for s in streams]
            try:
                assert all(r.status_code == 200 for r in responses)
                return await http.get("/events")
            finally:
                for s in streams:
                    await s.__aexit__(None, None, None)

    refused = asyncio.run(scenario())
    assert refused.status_code == 503
    assert str(CLIENTS) in refused.json()["detail"]
    assert int(refused.headers["retry-after"]) > 0


@pytest.mark.parametrize(
    "bad",
    ["99999999999999999999-0", "18446744073709551616-0", "0-18446744073709551616", "1-", "x-1"],
)
def test_out_of_range_or_malformed_ids_are_422(client, bad):
    answer = client.get("/events", headers={"Last-Event-ID": bad})
    assert answer.status_code == 422, answer.text
    assert "Last-Event-ID" in answer.json()["detail"]
    answer = client.get("/events", params={"last_id": bad})
    assert answer.status_code == 422, answer.text
    assert "last_id" in answer.json()["detail"]


def test_the_largest_stream_id_is_accepted(client):
    largest = f"{2**64 - 1}-{2**64 - 1}"
    with client.stream("GET", "/events", headers={"Last-Event-ID": largest}) as response:
        assert response.status_code == 200


def test_resume_catches_up_then_joins_the_live_feed_without_gaps_or_repeats(
    feed_api, redis_client, settings
):
    series_id = f"feed-{uuid.uuid4().hex[:8]}"
    stream = settings.stream_anomalies
    first = redis_client.xadd(stream, {"series_id": series_id, "timestamp": "0"})
    missed = [
        redis_client.xadd(stream, {"series_id": series_id, "timestamp": str(n)})
        for n in range(1, 251)  # more than one catch-up page
    ]

    async def scenario() -> list[str]:
        async with httpx.AsyncClient(base_url=feed_api, timeout=60) as http:
            async with http.stream(
                "GET", "/events", params={"series_id": series_id, "last_id": first}
            ) as response:
                assert response.status_code == 200
                lines = response.aiter_lines()
                got = [(await _next_event(lines, series_id))[0] for _ in range(100)]
                live = [
                    redis_client.xadd(stream, {"series_id": series_id, "timestamp": str(n)})
                    for n in range(251, 301)
                ]
                got += [(await _next_event(lines, series_id))[0] for _ in range(200)]
                assert got[-len(live) :] == live
                return got

    ids = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert ids == missed + ids[len(missed) :]
    assert len(set(ids)) == len(ids) == 300
