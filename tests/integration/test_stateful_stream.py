"""Stateful kinds end to end (seasonal, multiscale): REST fit, the worker's per-series state,
redelivery, races."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import numpy as np
import orjson
import psycopg
import pytest
import redis
from prometheus_client import CollectorRegistry

from detector.kinds.registry import STATEFUL
from detector.metrics import WorkerMetrics
from detector.redis_keys import model_key, state_key
from detector.settings import Settings
from detector.state.series import SeriesState, read_state
from detector.store.codec import ModelVersion
from detector.store.connections import postgres_pool
from detector.store.connections import redis_client as async_redis_client
from detector.transports.redis.worker import Worker
from detector.wire.events import EVENT_FIELDS
from tests.support.streams import events, publish, run_worker_async, stream_settings

START = 1_700_000_000
STEP = 300  # a 5-minute cadence
FIT_POINTS = 600


def fresh_series() -> str:
    return f"ms-{uuid.uuid4().hex[:10]}"


def noise(n: int, seed: int) -> list[float]:
    rng = np.random.default_rng(seed)
    return [round(float(x), 6) for x in 100.0 + rng.normal(0.0, 1.0, n)]


@pytest.fixture(params=sorted(STATEFUL))
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def fit_stateful(client: httpx.Client, series_id: str, kind: str, seed: int = 1) -> dict[str, Any]:
    answer = client.post(
        f"/fit/{series_id}",
        json={
            "timestamps": [START + STEP * i for i in range(FIT_POINTS)],
            "values": noise(FIT_POINTS, seed),
            "kind": kind,
        },
    )
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def stream_rows(series_id: str, values: list[float], first: int = FIT_POINTS) -> list[Any]:
    return [(series_id, START + STEP * (first + i), v) for i, v in enumerate(values)]


def state_of(settings: Settings, series_id: str) -> SeriesState:
    async def go() -> SeriesState | None:
        client = async_redis_client(settings)
        try:
            return await read_state(client, series_id)
        finally:
            await client.aclose()

    found = asyncio.run(go())
    assert found is not None
    return found


def test_fit_a_stateful_kind_over_rest(
    client: httpx.Client, redis_client: redis.Redis, pg: psycopg.Connection, kind: str
) -> None:
    series_id = fresh_series()
    bad = client.post(
        f"/fit/{series_id}", json={"timestamps": [1, 2, 3], "values": [1, 2, 4], "kind": "hmm"}
    )
    assert bad.status_code == 422 and "kind" in bad.text
    assert client.get(f"/models/{series_id}").status_code == 404  # nothing was stored

    fitted = fit_stateful(client, series_id, kind)
    assert {k: fitted[k] for k in ("series_id", "version", "points_used", "kind")} == {
        "series_id": series_id,
        "version": "v1.0.0",
        "points_used": FIT_POINTS,
        "kind": kind,
    }
    static = client.post(
        f"/fit/{series_id}",
        json={"timestamps": [1, 2, 3], "values": [1.0, 2.0, 4.0], "kind": "static"},
    )
    assert static.json()["kind"] == "static"

    def listed_kind() -> str:
        page = client.get("/models", params={"after": series_id[:-1], "limit": 1000}).json()
        return str({i["series_id"]: i["kind"] for i in page["items"]}[series_id])

    assert listed_kind() == "static"  # GET /models shows the latest version's kind
    fit_stateful(client, series_id, kind)
    assert listed_kind() == kind

    # PostgreSQL keeps the kind and the initial state; Redis' compact entry carries the kind.
    row = pg.execute(
        "SELECT kind, params FROM model_versions WHERE series_id = %s AND version = 1",
        (series_id,),
    ).fetchone()
    assert row is not None and row[0] == kind
    stored = row[1]["state"]["params"] if kind == "multiscale" else row[1]["params"]
    assert stored["k_point"] == 8.0
    raw = redis_client.hget(model_key(series_id), "1")
    assert orjson.loads(raw)[3] == "a" + kind[0]  # type: ignore[arg-type]  (above, the kind)
    assert ModelVersion.from_redis(series_id, 1, str(raw)).model.kind == kind

    # Predict keeps its two keys and applies the training data's μ + kσ (k = 3, above).
    for value, expected in ((fitted["upper"] + 0.5, True), (fitted["upper"] - 0.5, False)):
        answer = client.post(
            f"/predict/{series_id}", params={"version": "1"}, json={"timestamp": 1, "value": value}
        )
        assert answer.json() == {"anomaly": expected, "model_version": "v1.0.0"}


def test_worker_alerts_on_a_level_shift_and_resets_on_refit(
    settings: Settings, client: httpx.Client, redis_client: redis.Redis, kind: str
) -> None:
    s = stream_settings(settings, stream_batch_count=50)
    series_id = fresh_series()
    fit_stateful(client, series_id, kind)
    values = noise(400, seed=2)
    values[200:] = [v + 15.0 for v in values[200:]]  # a level shift of 15 σ at reading 200
    rows = stream_rows(series_id, values)
    ids = publish(redis_client, s.stream_readings, rows)
    asyncio.run(run_worker_async(s))

    got = [f for _, f in events(redis_client, s.stream_anomalies)]
    assert got, "the shift raised no event"
    assert all(list(f)[: len(EVENT_FIELDS)] == list(EVENT_FIELDS) for f in got)
    assert all(f["kind"] == kind and f["model_version"] == "v1.0.0" for f in got)
    onsets = [f for f in got if f["onset"] == "1"]
    assert int(onsets[0]["timestamp"]) == rows[200][1]  # alerted at the onset
    assert onsets[0]["source_id"] == onsets[0]["episode_id"] == ids[200]
    first = onsets[0]
    assert float(first["lower"]) < 100.0 < float(first["upper"])  # the slow baseline's band
    assert float(first["score"]) > 8.0  # signed z against it
    assert all(f["episode_id"] in {o["source_id"] for o in onsets} for f in got)
    state = state_of(settings, series_id)
    assert (state.version, state.count) == (1, 400)
    # Only the last batch's ids are remembered: the older ones had been acknowledged.
    assert 0 < len(state.ids) <= 50

    # A refit starts the series' state again from the new version's initial state.
    fit_stateful(client, series_id, kind, seed=3)
    s2 = s.model_copy(update={"model_refresh_seconds": 0.0})
    publish(redis_client, s2.stream_readings, stream_rows(series_id, noise(10, 4), first=400))
    asyncio.run(run_worker_async(s2))
    state = state_of(settings, series_id)
    assert (state.version, state.count) == (2, 10)


def test_two_workers_never_lose_a_state_update(
    settings: Settings, client: httpx.Client, redis_client: redis.Redis, kind: str
) -> None:
    s = stream_settings(settings, stream_batch_count=7)
    series = [fresh_series() for _ in range(2)]
    for i, series_id in enumerate(series):
        fit_stateful(client, series_id, kind, seed=10 + i)
    rows = [
        row for i in range(300) for row in stream_rows(series[i % 2], noise(1, i), FIT_POINTS + i)
    ]
    publish(redis_client, s.stream_readings, rows)

    async def both() -> list[Worker]:
        done = await asyncio.gather(
            run_worker_async(s, consumer="a"), run_worker_async(s, consumer="b")
        )
        return [w for w, _ in done]

    workers = asyncio.run(both())
    assert sum(w.processed for w in workers) == len(rows)
    for series_id in series:
        assert state_of(settings, series_id).count == 150


def test_redelivery_does_not_fold_twice(
    settings: Settings, client: httpx.Client, redis_client: redis.Redis, kind: str
) -> None:
    s = stream_settings(settings, stream_batch_count=1000)
    series_id = fresh_series()
    fit_stateful(client, series_id, kind)
    values = noise(100, seed=5)
    values[60:] = [v + 20.0 for v in values[60:]]
    publish(redis_client, s.stream_readings, stream_rows(series_id, values))

    async def crash_after_folding() -> list[dict[str, str]]:
        """Score and fold a batch, then 'crash' before committing it (it stays pending)."""
        client_ = async_redis_client(s)
        pool = postgres_pool(s)
        await pool.open()
        try:
            worker = Worker(
                s, client_, pool, metrics=WorkerMetrics(CollectorRegistry()), consumer="w"
            )
            await worker.ops.ensure_group()
            entries = await worker.ops.read("w", ">", 1000)
            outcome = await worker.pipeline.run(entries)
            return list(outcome.events.values())
        finally:
            await pool.close()
            await client_.aclose()

    first = asyncio.run(crash_after_folding())
    assert first and state_of(settings, series_id).count == 100
    assert events(redis_client, s.stream_anomalies) == []  # nothing committed yet

    asyncio.run(run_worker_async(s, consumer="w"))  # restarts: re-reads its pending entries
    state = state_of(settings, series_id)
    assert state.count == 100  # not folded again
    got = [f for _, f in events(redis_client, s.stream_anomalies)]

    def key(f: dict[str, str]) -> tuple[str, ...]:
        return tuple(f[k] for k in ("source_id", "score", "episode_id", "onset", "mean"))

    assert [key(f) for f in got] == [key(f) for f in first]  # the same events, once each
    assert redis_client.xpending(s.stream_readings, s.stream_group)["pending"] == 0
    assert redis_client.exists(state_key(series_id)) == 1


def test_initial_states_of_many_refits_come_from_one_query_and_match(
    settings: Settings, client: httpx.Client, kind: str
) -> None:
    """A batch that meets many new versions loads their params in one query; what it loads
    is what one query per version gives, and a version that does not exist is still reported
    as missing (its readings are skipped, not folded from nothing)."""
    from detector.errors import ModelNotFoundError
    from detector.store.models import ModelStore

    series = [fresh_series() for _ in range(3)]
    for i, series_id in enumerate(series):
        fit_stateful(client, series_id, kind, seed=10 + i)

    async def go() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        r, pool = async_redis_client(settings), postgres_pool(settings)
        await pool.open()
        try:
            bulk, single = ModelStore(r, pool), ModelStore(r, pool)
            await bulk.prefetch_params([(s, 1) for s in series] + [("no-such-series", 1)])
            pool_stats = pool.get_stats().get("requests_num", 0)
            loaded = [await bulk.params(s, 1) for s in series]
            assert pool.get_stats().get("requests_num", 0) == pool_stats  # all from the cache
            with pytest.raises(ModelNotFoundError):
                await bulk.params("no-such-series", 1)
            return loaded, [await single.params(s, 1) for s in series]
        finally:
            await pool.close()
            await r.aclose()

    loaded, one_by_one = asyncio.run(go())
    assert loaded == one_by_one and all(loaded)


def test_a_state_stored_as_a_hash_before_is_read_folded_and_replaced_keeping_its_ttl(
    settings: Settings, client: httpx.Client, redis_client: redis.Redis, kind: str
) -> None:
    """States were a hash of `seq` and `data` (JSON, a float row as base64): a worker reads
    one, folds onto it (the readings it recorded are not folded again) and writes it back as
    one string, seq moved on, its time to live (a backfill job's) kept."""
    from detector.kinds.registry import stateful_kind

    s = stream_settings(settings)
    series_id = fresh_series()
    fitted = fit_stateful(client, series_id, kind)
    assert fitted["version"] == "v1.0.0"
    plugin = stateful_kind(kind)
    assert plugin is not None

    async def params() -> dict[str, Any]:
        r, pool = async_redis_client(settings), postgres_pool(settings)
        await pool.open()
        try:
            from detector.store.models import ModelStore

            return await ModelStore(r, pool).params(series_id, 1)
        finally:
            await pool.close()
            await r.aclose()

    initial = plugin.initial_state(asyncio.run(params()))
    legacy = {
        "kind": kind,
        "version": 1,
        "count": 7,
        "episode_id": None,
        "ids": ["1-0"],
        "recent": [],
        "state": plugin.encode_state(initial),
    }
    key = state_key(series_id)
    redis_client.hset(key, mapping={"seq": "5", "data": orjson.dumps(legacy).decode()})
    redis_client.expire(key, 3600)
    publish(redis_client, s.stream_readings, stream_rows(series_id, noise(3, 9)))
    asyncio.run(run_worker_async(s))

    assert redis_client.type(key) == "string"
    assert redis_client.getrange(key, 0, 1) == "6\n"  # seq 5 moved on, in the string form
    assert 3500 < redis_client.ttl(key) <= 3600
    state = state_of(settings, series_id)
    assert (state.version, state.count) == (1, 10)
