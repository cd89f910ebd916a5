"""A worker's liveness record in Redis, and its reader (``python -m detector --check``)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import orjson
from redis.asyncio import Redis

from detector.redis_keys import heartbeat_key


@dataclass(frozen=True, slots=True)
class Health:
    """What a live worker last said about itself."""

    consumer: str
    pid: int
    at: float  # Unix seconds of the record
    processed: int  # readings committed since the worker started

    @property
    def age(self) -> float:
        return max(0.0, time.time() - self.at)


async def record_health(
    client: Redis, readings_stream: str, consumer: str, *, ttl: int, processed: int
) -> None:
    """Refresh the worker's record; it expires ``ttl`` seconds after the last refresh."""
    state = {"pid": os.getpid(), "at": time.time(), "processed": processed}
    await client.set(heartbeat_key(readings_stream, consumer), orjson.dumps(state), ex=ttl)


async def clear_health(client: Redis, readings_stream: str, consumer: str) -> None:
    await client.delete(heartbeat_key(readings_stream, consumer))


async def read_health(client: Redis, readings_stream: str) -> list[Health]:
    """Every live worker of the stream (records not yet expired), by consumer name."""
    prefix = heartbeat_key(readings_stream, "")
    found = []
    async for key in client.scan_iter(match=_glob_escape(prefix) + "*", count=1000):
        raw = await client.get(key)
        if raw is None:  # expired between the scan and the read
            continue
        name = key.decode() if isinstance(key, bytes) else str(key)
        state = orjson.loads(raw)
        found.append(
            Health(
                name[len(prefix) :], int(state["pid"]), float(state["at"]), int(state["processed"])
            )
        )
    return sorted(found, key=lambda h: h.consumer)


def _glob_escape(text: str) -> str:
    """``text`` as a literal in a SCAN MATCH pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)
