"""The fit scenario: a million points over HTTP against a parse and binary COPY of the same
points into a logged table."""

from __future__ import annotations

import time

import httpx
import numpy as np
import orjson
import psycopg

from bench.client import time_it
from bench.context import Context
from bench.report import Row


def scenario_fit(ctx: Context) -> list[Row]:
    n = 1_000_000
    rng = np.random.default_rng(4)
    ts = (1_600_000_000 + np.arange(n) * 60).tolist()
    body = orjson.dumps({"timestamps": ts, "values": rng.normal(50, 8, n).tolist()})
    repeats = 2 if ctx.quick else 3
    with httpx.Client(base_url=ctx.api_url, timeout=300) as http:
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            http.post(
                "/fit/fit-1m", content=body, headers={"content-type": "application/json"}
            ).raise_for_status()
            seconds.append(time.perf_counter() - start)
    ours = min(seconds)

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
