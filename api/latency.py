"""A window of recent request latencies, summarised as the healthcheck reports them."""

from __future__ import annotations

import math
from collections import deque


class LatencyWindow:
    """The last ``size`` durations of successful requests, in milliseconds (per process)."""

    def __init__(self, size: int = 1000) -> None:
        self._samples: deque[float] = deque(maxlen=size)

    def record(self, seconds: float) -> None:
        self._samples.append(seconds * 1000.0)

    def summary(self) -> dict[str, float]:
        """avg, and nearest-rank p50/p95/p99; all 0.0 before any request."""
        samples = sorted(self._samples)
        if not samples:
            return {"avg": 0.0, "p50": 0.0, "p95": 0.0, "p99": 0.0}
        return {
            "avg": round(sum(samples) / len(samples), 3),
            "p50": round(nearest_rank(samples, 50), 3),
            "p95": round(nearest_rank(samples, 95), 3),
            "p99": round(nearest_rank(samples, 99), 3),
        }


def nearest_rank(sorted_samples: list[float], percentile: float) -> float:
    """The nearest-rank percentile: the smallest sample with at least p% at or below it."""
    rank = max(1, math.ceil(percentile / 100.0 * len(sorted_samples)))
    return sorted_samples[rank - 1]
