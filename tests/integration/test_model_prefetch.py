"""A batch's models new to the process come from Redis in one call (``ModelStore.prefetch``):
the versions Redis has are cached as ``get`` would load them; the others are left to ``get``."""

from __future__ import annotations

import asyncio
import uuid

import httpx
import pytest

from detector.errors import ModelNotFoundError
from detector.settings import Settings
from detector.store.connections import postgres_pool
from detector.store.connections import redis_client as async_redis_client
from detector.store.models import ModelStore


def test_prefetched_versions_are_those_get_loads(settings: Settings, client: httpx.Client) -> None:
    series = [f"prefetch-{uuid.uuid4().hex[:8]}-{i}" for i in range(3)]
    for i, series_id in enumerate(series):
        answer = client.post(
            f"/fit/{series_id}",
            json={"timestamps": [1, 2, 3, 4], "values": [1.0, 2.0, 4.0 + i, 8.0], "kind": "static"},
        )
        assert answer.status_code == 200, answer.text

    async def go() -> None:
        r, pool = async_redis_client(settings), postgres_pool(settings)
        await pool.open()
        try:
            fresh, reference = ModelStore(r, pool), ModelStore(r, pool)
            await fresh.prefetch([(s, 1) for s in series] + [(series[0], 7)])
            for series_id in series:
                cached = fresh.cache.get((series_id, 1))
                assert cached is not None
                assert cached == await reference.get(series_id, 1)
            assert fresh.cache.get((series[0], 7)) is None  # no such version: left to get
            with pytest.raises(ModelNotFoundError):
                await fresh.get(series[0], 7)
        finally:
            await pool.close()
            await r.aclose()

    asyncio.run(go())
