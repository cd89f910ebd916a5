"""Bulk fit (``POST /fit``, ``anomaly-ingest fit``) against the real service: the versions,
rules, answers and Redis layout of single fits, many series at a time."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pyarrow as pa
import pytest
import redis

from detector.bulk_fit import BulkFit, SeriesPoints
from detector.errors import StoreUnavailableError
from detector.redis_keys import model_key
from detector.settings import Settings
from detector.store.connections import postgres_pool
from detector.store.connections import redis_client as async_redis_client
from detector.store.models import ModelStore
from tests.support.api import extra_api
from tests.support.services import ROOT, service_env

ARROW = {"content-type": "application/vnd.apache.arrow.stream"}
INGEST = [sys.executable, "-m", "ingest"]


def prefix() -> str:
    return f"bulk-{uuid.uuid4().hex[:8]}"


def points(seed: int, n: int = 32) -> tuple[list[int], list[float]]:
    rng = np.random.default_rng(seed)
    timestamps = (1_700_000_000 + 60 * rng.permutation(n)).tolist()  # in no order
    return timestamps, rng.normal(50 + seed, 1 + seed % 5, n).round(4).tolist()


def entry(series_id: str, seed: int, n: int = 32) -> dict[str, Any]:
    timestamps, values = points(seed, n)
    return {"series_id": series_id, "timestamps": timestamps, "values": values}


def bulk(client: httpx.Client, series: list[dict[str, Any]], **options: Any) -> dict[str, Any]:
    answer = client.post("/fit", json={"series": series, **options})
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def predict(client: httpx.Client, series_id: str, value: float) -> dict[str, Any]:
    answer = client.post(f"/predict/{series_id}", json={"timestamp": 1, "value": value})
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def versions(client: httpx.Client, series_id: str) -> list[dict[str, Any]]:
    answer = client.get(f"/models/{series_id}")
    assert answer.status_code == 200, answer.text
    found: list[dict[str, Any]] = answer.json()["versions"]
    for version in found:
        version.pop("created_at")
        version.pop("mlflow_run_id")
    return found


def arrow_rows(rows: list[tuple[str, int, float]]) -> bytes:
    table = pa.table(
        {
            "series_id": pa.array([r[0] for r in rows], pa.string()),
            "timestamp": pa.array([r[1] for r in rows], pa.int64()),
            "value": pa.array([r[2] for r in rows], pa.float64()),
        }
    )
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=50)
    return sink.getvalue().to_pybytes()


# ---------------------------------------------------------------- the same as single fits


def test_bulk_fitted_series_answer_as_their_single_fits(client: httpx.Client) -> None:
    """Each series of one request gets exactly the version, answer, stored rows and predict
    verdicts of a single fit of the same points."""
    name = prefix()
    series = [entry(f"{name}-{i}", i) for i in range(40)]
    answer = bulk(client, series, sigma=2.5, direction="both")
    assert answer["refused"] == []
    assert [f["series_id"] for f in answer["fitted"]] == [s["series_id"] for s in series]
    for given, fitted in zip(series, answer["fitted"], strict=True):
        single_id = f"{given['series_id']}-single"
        body = {k: given[k] for k in ("timestamps", "values")}
        single = client.post(f"/fit/{single_id}", json={**body, "sigma": 2.5, "direction": "both"})
        assert single.status_code == 200, single.text
        assert fitted == {**single.json(), "series_id": given["series_id"]}
        assert versions(client, given["series_id"]) == versions(client, single_id)
        for value in (fitted["lower"] - 0.01, fitted["mean"], fitted["upper"] + 0.01):
            assert predict(client, given["series_id"], value) == predict(client, single_id, value)


def test_the_redis_layout_is_a_single_fits(client: httpx.Client, redis_client: redis.Redis) -> None:
    name = prefix()
    bulk(client, [entry(f"{name}-a", 1)])
    single = client.post(
        f"/fit/{name}-b", json={k: entry("x", 1)[k] for k in ("timestamps", "values")}
    )
    assert single.status_code == 200
    a = redis_client.hgetall(model_key(f"{name}-a"))
    b = redis_client.hgetall(model_key(f"{name}-b"))
    assert a.keys() == b.keys() == {"1", "latest"}
    assert a["latest"] == b["latest"] == "1"
    # The same compact form, but for created_at (whole seconds, may differ by one).
    assert a["1"].split(",")[:5] == b["1"].split(",")[:5]


def test_versions_continue_from_existing_ones(client: httpx.Client) -> None:
    name = prefix()
    first = client.post(
        f"/fit/{name}", json={k: entry("x", 3)[k] for k in ("timestamps", "values")}
    )
    assert first.json()["version"] == "v1.0.0"
    second = bulk(client, [entry(name, 4), entry(f"{name}-new", 5)])
    assert [f["version"] for f in second["fitted"]] == ["v2.0.0", "v1.0.0"]
    third = bulk(client, [entry(name, 6)])
    assert third["fitted"][0]["version"] == "v3.0.0"
    assert predict(client, name, 0.0)["model_version"] == "v3.0.0"  # the latest moved
    assert [v["version"] for v in versions(client, name)] == ["v1.0.0", "v2.0.0", "v3.0.0"]
    listed = client.get("/models", params={"after": name, "limit": 1}).json()["items"]
    assert listed[0] == {
        "series_id": f"{name}-new",
        "latest_version": "v1.0.0",
        "versions": 1,
        "kind": "static",
    }


# ---------------------------------------------------------------- refusals


REFUSED_POINTS = [
    ({"timestamps": [1, 2], "values": [1.0, 2.0]}, "at least 3"),
    ({"timestamps": [1, 2, 3], "values": [5.0, 5.0, 5.0]}, "constant"),
    ({"timestamps": [1, 1, 3], "values": [1.0, 2.0, 3.0]}, "unique"),
    ({"timestamps": [1, 2.5, 3], "values": [1.0, 2.0, 3.0]}, "non-negative integers"),
    ({"timestamps": [1, 2, 3], "values": [1.0, 2.0]}, "same length"),
]


def test_a_refused_series_among_good_ones_is_refused_as_its_single_fit_and_the_rest_stored(
    client: httpx.Client,
) -> None:
    name = prefix()
    good = [entry(f"{name}-good-{i}", i) for i in range(3)]
    bad = [{"series_id": f"{name}-bad-{i}", **b} for i, (b, _) in enumerate(REFUSED_POINTS)]
    bad.append({**good[0], "series_id": "not an id!"})
    twice = dict(good[1])
    answer = bulk(client, [good[0], *bad[:3], good[1], *bad[3:], good[2], twice])
    assert [f["series_id"] for f in answer["fitted"]] == [g["series_id"] for g in good]
    refused = {r["series_id"]: r for r in answer["refused"]}
    assert len(answer["refused"]) == len(bad) + 1
    for given in bad:
        single = client.post(
            f"/fit/{given['series_id']}",
            json={"timestamps": given["timestamps"], "values": given["values"]},
        )
        assert refused[given["series_id"]]["status"] == single.status_code == 422
        assert refused[given["series_id"]]["detail"] == single.json()["detail"]
        if given["series_id"] != "not an id!":
            assert client.get(f"/models/{given['series_id']}").status_code == 404
    assert [r for r in answer["refused"] if r["series_id"] == twice["series_id"]] == [
        {
            "series_id": twice["series_id"],
            "status": 422,
            "detail": f"series '{twice['series_id']}' appears more than once in this bulk fit;"
            " give each series once, with all its points",
        }
    ]
    assert [v["version"] for v in versions(client, twice["series_id"])] == ["v1.0.0"]
    for (_, needle), given in zip(REFUSED_POINTS, bad, strict=False):
        assert needle in refused[given["series_id"]]["detail"]


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({}, 422, "series"),
        ({"series": []}, 422, "at least 1"),
        ({"series": {"a": 1}}, 422, "valid list"),
        ({"series": [1]}, 422, "dictionary"),
        ({"series": [{"series_id": "a", "timestamps": [1, 2, 3]}]}, 422, "values"),
        ({"series": [{"series_id": 1, "timestamps": [1], "values": [1.0]}]}, 422, "string"),
        ({"series": [{"series_id": "a", "timestamps": ["1"], "values": [1.0]}]}, 422, "number"),
        (
            {"series": [{"series_id": "a", "timestamps": [1], "values": [1.0], "kind": "x"}]},
            422,
            "Extra inputs",
        ),
        ({"series": [entry("a", 1)], "sigma": 0}, 422, "sigma"),
        ({"series": [entry("a", 1)], "kind": "nope"}, 422, "kind"),
        ({"series": [entry("a", 1)], "sigmaa": 2}, 422, "sigmaa"),
    ],
)
def test_bad_bulk_bodies_are_4xx_saying_what(
    client: httpx.Client, body: dict[str, Any], status: int, needle: str
) -> None:
    answer = client.post("/fit", json=body)
    assert answer.status_code == status, answer.text
    assert needle in answer.text


def test_more_points_than_the_limit_are_413(settings: Settings) -> None:
    name = prefix()
    with extra_api(settings, MAX_BULK_FIT_POINTS="100") as api:
        under = [entry(f"{name}-{i}", i, 25) for i in range(4)]
        assert api.post("/fit", json={"series": under}).status_code == 200
        over = api.post("/fit", json={"series": [*under, entry(f"{name}-x", 9, 1)]})
        assert over.status_code == 413, over.text
        assert "at most 100 points" in over.json()["detail"]
        rows = [(f"{name}-a", 1_700_000_000 + i, float(i % 7)) for i in range(101)]
        arrow_over = api.post("/fit", content=arrow_rows(rows), headers=ARROW)
        assert arrow_over.status_code == 413, arrow_over.text


def test_unsupported_content_type_is_415(client: httpx.Client) -> None:
    answer = client.post("/fit", content=b"a,b", headers={"content-type": "text/csv"})
    assert answer.status_code == 415


# ---------------------------------------------------------------- Arrow bodies


def test_an_arrow_body_of_interleaved_rows_fits_as_json(client: httpx.Client) -> None:
    name = prefix()
    series = [entry(f"{name}-{i}", i) for i in range(5)]
    rows = [
        (s["series_id"], t, v)
        for j in range(32)
        for s in series
        for t, v in [(s["timestamps"][j], s["values"][j])]
    ]
    rows.append((f"{name}-short", 1, 1.0))
    answer = client.post("/fit", content=arrow_rows(rows), headers=ARROW, params={"sigma": 2})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert [f["series_id"] for f in body["fitted"]] == [s["series_id"] for s in series]
    assert body["refused"] == [
        {
            "series_id": f"{name}-short",
            "status": 422,
            "detail": "a fit needs at least 3 points (got 1)",
        }
    ]
    json_twin = bulk(client, [dict(s, series_id=f"{s['series_id']}-j") for s in series], sigma=2)
    for a, b in zip(body["fitted"], json_twin["fitted"], strict=True):
        assert {**a, "series_id": ""} == {**b, "series_id": ""}


def test_a_malformed_arrow_bulk_body_is_422(client: httpx.Client) -> None:
    table = pa.table({"timestamp": pa.array([1, 2, 3]), "value": pa.array([1.0, 2.0, 3.0])})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    answer = client.post("/fit", content=sink.getvalue().to_pybytes(), headers=ARROW)
    assert answer.status_code == 422
    assert "no 'series_id' column" in answer.json()["detail"]


# ---------------------------------------------------------------- batches, in process


def test_many_batches_keep_order_and_counts(settings: Settings) -> None:
    """A job of several batches (a small batch size here), fitted while the previous batch
    is stored: every series stored once, in order, counted on the job's row."""
    name = prefix()
    given = [SeriesPoints(f"{name}-{i:03d}", *points(i, 8)) for i in range(25)]
    given.insert(7, SeriesPoints(f"{name}-flat", [1, 2, 3], [1.0, 1.0, 1.0]))

    async def run() -> tuple[Any, list[Any]]:
        redis_async, pool = async_redis_client(settings), postgres_pool(settings)
        await pool.open()
        outcomes: list[Any] = []
        try:
            store = ModelStore(redis_async, pool)
            job = BulkFit(store, settings, source="test", kind="static", batch_series=4)
            summary = await job.run(given, outcomes.append)
            async with pool.connection() as conn:
                cur = await conn.execute(
                    "SELECT status, fitted, refused, points, refusals FROM fit_jobs WHERE id = %s",
                    (summary.job,),
                )
                row = await cur.fetchone()
            await store.publisher.close()
        finally:
            await pool.close()
            await redis_async.aclose()
        return (summary, row), outcomes

    (summary, row), outcomes = asyncio.run(run())
    assert len(outcomes) == 7
    stored = [v.series_id for o in outcomes for v in o.stored]
    assert stored == [g.series_id for g in given if not g.series_id.endswith("flat")]
    assert (summary.fitted, summary.refused, summary.points) == (25, 1, 200)
    assert row[:4] == ("finished", 25, 1, 200)
    assert row[4][0]["series_id"] == f"{name}-flat"


def test_a_store_failure_stops_the_job_keeping_the_batches_before(settings: Settings) -> None:
    name = prefix()
    given = [SeriesPoints(f"{name}-{i}", *points(i, 8)) for i in range(10)]

    async def run() -> tuple[str, Any, int]:
        redis_async, pool = async_redis_client(settings), postgres_pool(settings)
        await pool.open()
        try:
            store = ModelStore(redis_async, pool)
            save_fits, calls = store.save_fits, []

            async def failing(fits: Any, **options: Any) -> Any:
                calls.append(len(fits))
                if len(calls) == 2:
                    raise StoreUnavailableError("redis", "Redis is unavailable, the 4 fits …")
                return await save_fits(fits, **options)

            store.save_fits = failing  # type: ignore[method-assign]
            job = BulkFit(store, settings, source="test", kind="static", batch_series=4)
            with pytest.raises(StoreUnavailableError) as raised:
                await job.run(given)
            async with pool.connection() as conn:
                cur = await conn.execute(
                    "SELECT status, fitted FROM fit_jobs ORDER BY id DESC LIMIT 1"
                )
                row = await cur.fetchone()
                cur = await conn.execute(
                    "SELECT count(*) FROM model_versions WHERE series_id LIKE %s", (f"{name}-%",)
                )
                stored = await cur.fetchone()
            await store.publisher.close()
        finally:
            await pool.close()
            await redis_async.aclose()
        assert stored is not None
        return raised.value.detail, row, int(stored[0])

    detail, row, stored = asyncio.run(run())
    assert "4 series were stored before this" in detail
    assert row == ("failed", 4)
    assert stored == 4


# ---------------------------------------------------------------- the command line


def test_the_fit_command_fits_a_csv_end_to_end(
    settings: Settings, client: httpx.Client, tmp_path: Path
) -> None:
    name = prefix()
    series = {f"{name}-{i}": points(i) for i in range(6)}
    lines = ["value,timestamp,series_id,note"]
    for j in range(32):
        for series_id, (timestamps, values) in series.items():
            lines.append(f"{values[j]},{timestamps[j]},{series_id},x")
    lines += [f"1.0,{t},{name}-flat,x" for t in (1, 2, 3)]
    path = tmp_path / "fit.csv"
    path.write_text("\n".join(lines) + "\n")
    done = subprocess.run(
        [*INGEST, "fit", "--csv", str(path), "--kind", "static", "--sigma", "2"],
        env=service_env(settings),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr  # one series refused
    assert f"series {name}-flat: refused: values are constant" in done.stderr
    assert "6 series fitted, 1 refused, 192 points in" in done.stderr
    for series_id, (timestamps, values) in series.items():
        single = client.post(
            f"/fit/{series_id}-single",
            json={"timestamps": timestamps, "values": values, "sigma": 2, "kind": "static"},
        ).json()
        (version,) = versions(client, series_id)
        assert version["mean"] == single["mean"] and version["std"] == single["std"]
        assert version["sigma"] == 2.0 and version["kind"] == "static"
        assert predict(client, series_id, single["upper"] + 0.01)["anomaly"] is True


def test_the_fit_command_refuses_only_the_series_with_a_bad_cell(
    settings: Settings, client: httpx.Client, tmp_path: Path
) -> None:
    name = prefix()
    path = tmp_path / "cells.csv"
    path.write_text(
        "series_id,timestamp,value\n"
        + "".join(f"{name}-ok,{t},{v}\n" for t, v in [(1, 1.0), (2, 2.0), (3, 4.0)])
        + "".join(f"{name}-iso,2024-01-0{d}T00:00:00,{d}.5\n" for d in (1, 2, 3))
        + f"{name}-ts,1,1.0\n{name}-ts,2.5,2.0\n{name}-ts,3,3.0\n"
        + f"{name}-v,1,1.0\n{name}-v,2,abc\n{name}-v,3,3.0\n"
    )
    done = subprocess.run(
        [*INGEST, "fit", "--csv", str(path), "--kind", "static"],
        env=service_env(settings),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "2 series fitted, 2 refused" in done.stderr, done.stderr
    assert f"series {name}-ts: refused: timestamps must be non-negative integers" in done.stderr
    assert f"series {name}-v: refused: values must be finite numbers" in done.stderr
    assert versions(client, f"{name}-ok")[0]["points_used"] == 3
    assert versions(client, f"{name}-iso")[0]["points_used"] == 3


def test_the_fit_command_refuses_a_bad_option_or_header(settings: Settings, tmp_path: Path) -> None:
    path = tmp_path / "h.csv"
    path.write_text("id,timestamp,value\na,1,1\n")
    for args, needle in (
        (["--sigma", "0"], "sigma must be"),
        (["--kind", "nope"], "unknown detector kind"),
        ([], "must name the columns"),
    ):
        done = subprocess.run(
            [*INGEST, "fit", "--csv", str(path), *args],
            env=service_env(settings),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode != 0 and needle in done.stderr, done.stderr
