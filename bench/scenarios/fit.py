"""The fit scenarios: a million points over HTTP as JSON against a parse and binary COPY of the
same points into a logged table, and as an Arrow body against ``json.loads`` of the same
points' JSON body."""

from __future__ import annotations

import json
import time

import httpx
import numpy as np
import orjson
import psycopg

from api.schemas import ARROW_MEDIA_TYPE
from bench.client import arrow_stream, time_it
from bench.context import Context
from bench.report import Row

_FIT_POINTS = 1_000_000


def _fit_points() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(4)
    return 1_600_000_000 + np.arange(_FIT_POINTS) * 60, rng.normal(50, 8, _FIT_POINTS)


def _json_body(ts: np.ndarray, values: np.ndarray) -> bytes:
    return orjson.dumps({"timestamps": ts.tolist(), "values": values.tolist()})


def _fit_seconds(ctx: Context, body: bytes, content_type: str, repeats: int) -> float:
    """The fastest of ``repeats`` fits of ``body`` over HTTP, end to end."""
    with httpx.Client(base_url=ctx.api_url, timeout=300) as http:
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            http.post(
                "/fit/fit-1m", content=body, headers={"content-type": content_type}
            ).raise_for_status()
            seconds.append(time.perf_counter() - start)
    return min(seconds)


def scenario_fit(ctx: Context) -> list[Row]:
    n = _FIT_POINTS
    body = _json_body(*_fit_points())
    repeats = 2 if ctx.quick else 3
    ours = _fit_seconds(ctx, body, "application/json", repeats)

    # The baseline stores the same points the way a fit must: parsed, then COPYed into a
    # logged table of training_points' shape and committed (durable, like ours). A temporary
    # table would skip the write-ahead log and measure less than durability costs.
    with psycopg.connect(ctx.conninfo, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS copy_baseline (model_id bigint, ts bigint, value float8)"
        )

    def parse_and_copy() -> None:
        parsed = orjson.loads(body)
        rows = np.empty(
            n,
            dtype=[
                ("n", ">i2"),
                ("l0", ">i4"),
                ("m", ">i8"),
                ("l1", ">i4"),
                ("a", ">i8"),
                ("l2", ">i4"),
                ("b", ">f8"),
            ],
        )
        rows["n"], rows["l0"], rows["l1"], rows["l2"] = 3, 8, 8, 8
        rows["m"] = 1
        rows["a"] = np.asarray(parsed["timestamps"], dtype=np.int64)
        rows["b"] = np.asarray(parsed["values"], dtype=np.float64)
        with psycopg.connect(ctx.conninfo) as conn:
            with conn.cursor().copy("COPY copy_baseline FROM STDIN (FORMAT BINARY)") as copy:
                copy.write(b"PGCOPY\n\xff\r\n\x00" + bytes(8))
                copy.write(rows.tobytes())
                copy.write(b"\xff\xff")
            conn.commit()

    base = min(time_it(parse_and_copy, 1) for _ in range(repeats))
    ratio = ours / base
    return [
        Row(
            "fit, 1,000,000 points over HTTP",
            "end-to-end time",
            ours,
            "s",
            base,
            "orjson parse + binary COPY of the same points into a logged table",
            ratio,
            "≤ 1.5×",
            ratio <= 1.5,
        )
    ]


def scenario_fit_arrow(ctx: Context) -> list[Row]:
    """The same points as an Arrow body, against what merely reading their JSON body with the
    standard library costs (``json.loads``), measured in the same run."""
    ts, values = _fit_points()
    body, json_body = arrow_stream(ts, values), _json_body(ts, values)
    repeats = 2 if ctx.quick else 3
    ours = _fit_seconds(ctx, body, ARROW_MEDIA_TYPE, repeats)
    base = min(time_it(lambda: json.loads(json_body), 1) for _ in range(repeats))
    ratio = ours / base
    return [
        Row(
            "fit, 1,000,000 points over HTTP, Arrow body",
            "end-to-end time",
            ours,
            "s",
            base,
            "json.loads of the same points' JSON body",
            ratio,
            "≤ 1.5×",
            ratio <= 1.5,
        )
    ]
