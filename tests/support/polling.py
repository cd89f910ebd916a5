"""Waiting for a condition in tests: a deadline against hangs, never a timing assertion."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import redis

# A server being killed or restarted by a fault test: "not yet", not a failure of the check.
REDIS_CONNECTION_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


def wait_for(check: Callable[[], Any], what: str, timeout: float = 90.0) -> Any:
    """Poll until ``check()`` is truthy and return what it returned (a Redis connection
    error counts as not yet)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            found = check()
        except REDIS_CONNECTION_ERRORS:
            found = None
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"gave up waiting for {what}")
