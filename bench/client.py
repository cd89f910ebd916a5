"""The scenarios' client side: fitting series over HTTP, predict requests, the load generator
process that sends them, and timing a baseline."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import orjson
import pyarrow as pa

from bench.context import Context
from bench.harness import ROOT


def run_loadgen(
    ctx: Context,
    paths: list[str],
    bodies: list[bytes],
    *,
    connections: int = 16,
    duration: float = 8.0,
    warmup: float = 1.0,
    content_type: str = "application/json",
    port: int | None = None,
) -> dict[str, float]:
    """Drive the server (the API, or the one on ``port``) from a separate process so client
    and server do not share a GIL."""
    spec = json.dumps(
        {
            "paths": paths,
            "bodies": [b.decode("latin-1") for b in bodies],  # any bytes, one char each
            "content_type": content_type,
        }
    )
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.loadgen",
            "--port",
            str(port or ctx.api_port),
            "--connections",
            str(connections),
            "--duration",
            str(duration),
            "--warmup",
            str(warmup),
        ],
        input=spec.encode(),
        capture_output=True,
        check=True,
        cwd=ROOT,
    )
    result: dict[str, float] = json.loads(out.stdout)
    return result


def fit_series(
    ctx: Context,
    ids: list[str],
    concurrency: int = 16,
    *,
    kind: str | None = None,
    timestamps: list[int] | None = None,
) -> None:
    """Fit small models for many series over HTTP (the real path), in parallel: 32 points,
    at ``timestamps`` (default 0 … 31), with ``kind`` (default: the service's)."""
    rng = np.random.default_rng(0)
    values = rng.normal(50, 5, 32).tolist()
    fit: dict[str, object] = {"timestamps": timestamps or list(range(32)), "values": values}
    if kind is not None:
        fit["kind"] = kind
    body = orjson.dumps(fit)

    async def run() -> None:
        limits = httpx.Limits(max_connections=concurrency)
        async with httpx.AsyncClient(base_url=ctx.api_url, limits=limits, timeout=120) as http:
            queue = list(ids)

            async def worker() -> None:
                while queue:
                    sid = queue.pop()
                    for attempt in range(3):
                        try:
                            r = await http.post(
                                f"/fit/{sid}",
                                content=body,
                                headers={"content-type": "application/json"},
                            )
                            break
                        except (httpx.ReadError, httpx.RemoteProtocolError):
                            # A pooled keep-alive connection the server closed as we reused
                            # it; a repeated fit only adds a version, which is harmless here.
                            if attempt == 2:
                                raise
                    r.raise_for_status()

            await asyncio.gather(*(worker() for _ in range(concurrency)))

    asyncio.run(run())


def predict_requests(ids: list[str], rng: np.random.Generator) -> tuple[list[str], list[bytes]]:
    """One /predict request a series id in ``ids``, each with a random value."""
    paths = [f"/predict/{sid}" for sid in ids]
    bodies = [
        orjson.dumps({"timestamp": 1_700_000_000 + i, "value": float(v)})
        for i, v in enumerate(rng.normal(50, 8, len(ids)))
    ]
    return paths, bodies


def arrow_stream(timestamps: Any, values: Any) -> bytes:
    """An Arrow IPC stream body of the points (int64 timestamps, float64 values)."""
    table = pa.table(
        {
            "timestamp": pa.array(np.asarray(timestamps, dtype=np.int64)),
            "value": pa.array(np.asarray(values, dtype=np.float64)),
        }
    )
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    body: bytes = sink.getvalue().to_pybytes()
    return body


def time_it(fn: Callable[[], Any], repeats: int) -> float:
    """Seconds for ``repeats`` calls of ``fn``, after one call to warm it."""
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return time.perf_counter() - start
