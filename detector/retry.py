"""Waiting out an unavailable dependency: the one doubling, capped pause every retry loop of
the workers uses (the Redis worker's consume loop and in-place steps, the anomaly history
write, the Kafka scorer), and the loop that retries a step with it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

# The longest pause between two attempts, in seconds.
MAX_BACKOFF = 5.0


class Backoff:
    """Pauses of ``first`` seconds, doubling after each up to ``MAX_BACKOFF``."""

    def __init__(self, first: float = 0.1) -> None:
        self.first = first
        self.pause = first

    def reset(self) -> None:
        """After a success: the next failure waits ``first`` again."""
        self.pause = self.first

    async def wait(self) -> None:
        """Sleep the current pause, then double it (capped)."""
        await asyncio.sleep(self.pause)
        self.pause = min(MAX_BACKOFF, self.pause * 2)


async def retry_while(
    step: Callable[[], Awaitable[T]],
    retryable: Callable[[Exception], bool],
    *,
    log: logging.Logger,
    what: str = "dependency unavailable",
    first: float = 0.1,
    before_retry: Callable[[], Awaitable[None]] | None = None,
) -> T:
    """Run ``step`` until it returns; an exception ``retryable`` accepts is logged and the step
    tried again after a ``Backoff`` pause (and ``before_retry``), any other propagates."""
    backoff = Backoff(first)
    while True:
        try:
            return await step()
        except Exception as exc:
            if not retryable(exc):
                raise
            log.warning("%s (%s); retrying in %.1f s", what, exc, backoff.pause)
        await backoff.wait()
        if before_retry is not None:
            await before_retry()
