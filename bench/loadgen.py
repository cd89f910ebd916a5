"""A keep-alive HTTP/1.1 load generator on asyncio, run as its own process.

Why not wrk: it needs root to install here, and this client is fast enough (tens of thousands
of requests a second on one core) to leave the server the bottleneck. Both our route and its
baseline are driven by this same client, so the ratio is fair either way.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any


def build_requests(
    host: str,
    port: int,
    paths: list[str],
    bodies: list[bytes],
    content_type: str = "application/json",
) -> list[bytes]:
    out = []
    for path, body in zip(paths, bodies, strict=True):
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        out.append(head.encode() + body)
    return out


async def connection(
    host: str,
    port: int,
    requests: list[bytes],
    offset: int,
    stop_at: float,
    latencies: list[float],
    errors: list[int],
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    i = offset
    n = len(requests)
    try:
        while time.perf_counter() < stop_at:
            start = time.perf_counter()
            writer.write(requests[i % n])
            i += 1
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            if length:
                await reader.readexactly(length)
            latencies.append(time.perf_counter() - start)
            if status != 200:
                errors.append(status)
    finally:
        writer.close()


async def run(args: argparse.Namespace, spec: dict[str, Any]) -> dict[str, float]:
    requests = build_requests(
        args.host,
        args.port,
        spec["paths"],
        [b.encode("latin-1") for b in spec["bodies"]],
        spec.get("content_type", "application/json"),
    )
    latencies: list[float] = []
    errors: list[int] = []
    # Warm-up: connections, caches, JIT-free but allocator-warm.
    warm_stop = time.perf_counter() + args.warmup
    await asyncio.gather(
        *(
            connection(args.host, args.port, requests, c * 97, warm_stop, [], [])
            for c in range(args.connections)
        )
    )
    start = time.perf_counter()
    stop = start + args.duration
    await asyncio.gather(
        *(
            connection(args.host, args.port, requests, c * 97, stop, latencies, errors)
            for c in range(args.connections)
        )
    )
    elapsed = time.perf_counter() - start
    latencies.sort()
    n = len(latencies)
    return {
        "requests": n,
        "seconds": elapsed,
        "rps": n / elapsed,
        "p50_ms": latencies[n // 2] * 1000 if n else 0.0,
        "p99_ms": latencies[min(n - 1, int(n * 0.99))] * 1000 if n else 0.0,
        "errors": len(errors),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    args = parser.parse_args()
    # {"paths": [...], "bodies": [...], "content_type": ...}; bodies are bytes as latin-1 text
    spec = json.load(sys.stdin)
    result = asyncio.run(run(args, spec))
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
