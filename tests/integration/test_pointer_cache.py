"""The tracked latest-pointer cache, against the real Redis: invalidation, flush, races, loss."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from api.pointer_cache import LatestPointerCache
from detector.redis_keys import model_key
from tests.support.services import start_api


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


@pytest.fixture
def cache(settings):
    pointers = LatestPointerCache(settings.redis_connection_url())
    loop = asyncio.new_event_loop()
    loop.run_until_complete(pointers._ensure_connected())
    assert pointers.active
    yield pointers
    pointers._drop_connection()
    loop.close()


def test_a_change_to_the_series_hash_drops_its_pointer(cache, redis_client, series_id):
    cache.put(series_id, 1, cache.generation)
    cache.put("other-" + series_id, 7, cache.generation)
    assert cache.get(series_id) == 1
    redis_client.hset(model_key(series_id), "latest", "2")
    wait_for(lambda: cache.get(series_id) is None)
    assert cache.get("other-" + series_id) == 7  # only that series was touched


def test_keys_of_lookalike_ids_are_told_apart(cache, redis_client, series_id):
    cache.put(series_id, 1, cache.generation)
    cache.put(f"{series_id}:latest", 5, cache.generation)
    redis_client.hset(model_key(f"{series_id}:latest"), "latest", "6")
    wait_for(lambda: cache.get(f"{series_id}:latest") is None)
    assert cache.get(series_id) == 1


def test_flush_drops_everything(cache, redis_client, series_id):
    cache.put(series_id, 3, cache.generation)
    redis_client.flushall()
    wait_for(lambda: cache.get(series_id) is None)


def test_a_fill_that_raced_an_invalidation_is_not_kept(cache, redis_client, series_id):
    before = cache.generation
    redis_client.hset(model_key(series_id), "latest", "4")  # lands while "our read" is in flight
    wait_for(lambda: (cache.drain(), cache.generation != before)[1])
    cache.put(series_id, 3, before)
    assert cache.get(series_id) is None


def test_a_lost_connection_disables_the_cache(cache, redis_client, series_id):
    cache.put(series_id, 3, cache.generation)
    redis_client.client_kill_filter(_type="pubsub")
    wait_for(lambda: (cache.drain(), not cache.active)[1])
    assert cache.get(series_id) is None
    cache.put(series_id, 3, cache.generation)
    assert cache.get(series_id) is None  # nothing is trusted until it reconnects


def test_read_your_writes_across_processes_under_a_tight_loop(settings, client, series_id):
    fit = {"timestamps": [1, 2, 3, 4], "values": [1.0, 2.0, 3.0, 5.0]}
    assert client.post(f"/fit/{series_id}", json=fit).status_code == 200
    proc, other_url = start_api(settings)
    try:
        with httpx.Client(base_url=other_url) as other:
            point = {"timestamp": 1, "value": 1.0}
            for expected in range(1, 41):
                if expected > 1:
                    assert client.post(f"/fit/{series_id}", json=fit).status_code == 200
                answer = other.post(f"/predict/{series_id}", json=point).json()
                assert answer["model_version"] == f"v{expected}.0.0"
    finally:
        proc.terminate()
        proc.wait(30)
