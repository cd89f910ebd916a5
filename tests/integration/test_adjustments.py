"""The workers' read of the series' feedback adjustments, on one Redis and on a cluster: a
series without feedback, with an adjustment, with the three scales of before, unreadable."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from detector.feedback import Adjustment
from detector.redis_keys import feedback_key
from detector.settings import Settings
from detector.state.adjustments import Adjustments
from detector.store.connections import redis_client


def _write(client, series_ids: list[str]) -> dict[str, tuple[float, ...]]:
    """Feedback for all but the first series; what each should resolve to."""
    plain, adjusted, legacy, broken, *many = series_ids
    adjustment = Adjustment.from_scales([1.5, 1.0, 2.0])
    client.hset(feedback_key(adjusted), mapping={"adjustment": orjson.dumps(adjustment.to_dict())})
    client.hset(feedback_key(legacy), mapping={"point": "1.25", "shift": "1", "divergence": "1"})
    client.hset(feedback_key(broken), mapping={"adjustment": "{not json"})
    return {
        plain: (),
        adjusted: adjustment.vector(),
        legacy: Adjustment.from_scales([1.25, 1.0, 1.0]).vector(),
        broken: (),
        **{s: () for s in many},
    }


@pytest.mark.parametrize("where", ["one Redis", "cluster"])
def test_adjustments_resolve_every_form(request, where: str, series_id: str) -> None:
    settings: Settings = request.getfixturevalue(
        "settings" if where == "one Redis" else "cluster_settings"
    )
    sync = request.getfixturevalue("redis_client" if where == "one Redis" else "rc")
    # More series than one script call takes, so the reads are split.
    ids = [f"{series_id}-{i}" for i in range(6_000)]
    expected = _write(sync, ids)

    async def scenario() -> tuple[dict, dict, dict]:
        client = redis_client(settings)
        try:
            adjustments = Adjustments(client, ttl=60.0)
            first = await adjustments.resolve(ids)
            # Cached for the ttl: a change is not seen yet, then seen by a fresh view.
            sync.delete(feedback_key(ids[1]))
            cached = await adjustments.resolve(ids[:2])
            fresh = await Adjustments(client, ttl=60.0).resolve(ids[:2])
            return first, cached, fresh
        finally:
            await client.aclose()

    first, cached, fresh = asyncio.run(scenario())
    assert first == expected
    assert cached == {ids[0]: (), ids[1]: expected[ids[1]]}
    assert expected[ids[1]] != ()
    assert fresh == {ids[0]: (), ids[1]: ()}
