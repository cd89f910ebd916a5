"""Two processes folding one series: each keeps the states it wrote and folds them again
without a read; a state the other wrote since fails the compare-and-set and is read again,
so every reading is folded once, in order, whoever folds it."""

from __future__ import annotations

import asyncio
import uuid

import httpx
import numpy as np

from detector.settings import Settings
from detector.state.series import Below, SeriesStates, StreamReading, read_state
from detector.store.connections import postgres_pool
from detector.store.connections import redis_client as async_redis_client
from detector.store.models import ModelStore

START = 1_700_000_000
STEP = 300


def test_a_state_written_by_another_process_is_read_again_and_nothing_is_lost(
    settings: Settings, client: httpx.Client
) -> None:
    series = [f"cas-{uuid.uuid4().hex[:8]}-{i}" for i in range(3)]
    rng = np.random.default_rng(4)
    for series_id in series:
        answer = client.post(
            f"/fit/{series_id}",
            json={
                "timestamps": [START + STEP * i for i in range(600)],
                "values": (100 + rng.normal(0, 1, 600)).round(6).tolist(),
                "kind": "seasonal",
            },
        )
        assert answer.status_code == 200, answer.text
    version = 1

    def batch(first: int, n: int) -> list[StreamReading]:
        """n readings of every series, entry ids and timestamps after those of ``first``."""
        return [
            StreamReading(
                f"{first + i + 1}-{k}",
                s,
                START + STEP * (600 + first + i),
                100.0,
                version,
                "seasonal",
            )
            for i in range(n)
            for k, s in enumerate(series)
        ]

    async def go() -> tuple[int, int, list[int]]:
        r, pool = async_redis_client(settings), postgres_pool(settings)
        await pool.open()
        try:
            store = ModelStore(r, pool)
            one, two = SeriesStates(r, store), SeriesStates(r, store)
            await one.fold(batch(0, 4), detected_at=0.0, acknowledged=Below((1, 0)))
            await two.fold(batch(4, 4), detected_at=0.0, acknowledged=Below((5, 0)))
            # ``one`` still holds the states of its own write: stale now, refused, read again.
            await one.fold(batch(8, 4), detected_at=0.0, acknowledged=Below((9, 0)))
            counts = [(await read_state(r, s)).count for s in series]  # type: ignore[union-attr]
            return one.conflicts, two.conflicts, counts
        finally:
            await pool.close()
            await r.aclose()

    first_conflicts, second_conflicts, counts = asyncio.run(go())
    assert (first_conflicts, second_conflicts) == (len(series), 0)
    assert counts == [12, 12, 12]  # every reading folded once
