"""Fit latency with MLflow tracking off and on (a local sqlite store), alternating, against
real Redis, PostgreSQL and the API: ``python -m bench.tracking [FITS] [POINTS] [PAUSE_S]``."""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import httpx

from bench.harness import api_process, embedded_servers
from detector.settings import Settings


def timed_fits(settings: Settings, args: argparse.Namespace, **env: str) -> list[float]:
    """Start an API (with ``env``), warm it up, then time ``args.fits`` fits in ms."""
    with api_process(settings, ["-m", "api", "--log-level", "warning"], **env) as api:
        body = {
            "timestamps": list(range(args.points)),
            "values": [float(i % 17) for i in range(args.points)],
        }
        times = []
        with httpx.Client(base_url=api.url, timeout=60) as http:
            for _ in range(20):  # warm-up
                http.post(f"/fit/warm-{uuid.uuid4().hex[:8]}", json=body).raise_for_status()
            for i in range(args.fits):
                start = time.perf_counter()
                http.post(
                    f"/fit/bench-{i % 20}-{uuid.uuid4().hex[:6]}", json=body
                ).raise_for_status()
                times.append((time.perf_counter() - start) * 1000)
                time.sleep(args.pause)
        return times


def report(name: str, times: list[float]) -> None:
    ordered = sorted(times)

    def pct(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    print(
        f"{name:>14}: n={len(times)} mean={statistics.mean(times):.2f} ms "
        f"p50={pct(0.5):.2f} p95={pct(0.95):.2f} p99={pct(0.99):.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("fits", type=int, nargs="?", default=200)
    parser.add_argument("points", type=int, nargs="?", default=1000)
    parser.add_argument("pause", type=float, nargs="?", default=0.0)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-tracking-"))
    try:
        with embedded_servers(tmp) as servers:
            settings = servers.settings
            tracked = {
                "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}",
                "MLFLOW_ARTIFACTS_DESTINATION": str(tmp / "artifacts"),
            }
            runs = [
                ("tracking off", {}),
                ("tracking on", tracked),
                ("off (again)", {}),
                ("on (again)", tracked),
            ]
            results = [(name, timed_fits(settings, args, **env)) for name, env in runs]
        print(f"{args.fits} fits of {args.points} points, {args.pause} s between fits")
        for name, times in results:
            report(name, times)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
