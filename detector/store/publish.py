"""Copying committed model versions into Redis: the one writer of the model hashes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

from detector.errors import REDIS_FAILURES, redis_unavailable
from detector.redis_keys import model_key
from detector.scripts import lua
from detector.store.codec import ModelVersion
from detector.store.replication import ReplicaWait, write_then_wait_async

log = logging.getLogger(__name__)


_RETRY_FIRST = 0.5
_RETRY_MAX = 5.0
# Scripts a pipeline sends in one round trip (a bulk fit's batch is a thousand versions).
_PIPELINE = 1000


@dataclass(frozen=True, slots=True)
class PutOutcome:
    """How many versions of a put Redis did not confirm (each owed), and why."""

    unconfirmed: int
    cause: BaseException | None


class VersionPublisher:
    """Puts versions PostgreSQL has committed into Redis, and only those.

    A put that fails or gets no clear answer (a timeout, a reset connection) may or may not
    have reached Redis; either way the version is durable, so it is kept and put again in the
    background until Redis confirms it. The put is idempotent and moves ``latest`` forward
    only, so repeating it, or repeating it after a newer version, changes nothing.

    With ``wait`` (REDIS_WAIT_REPLICAS) Redis confirms a put only once that many replicas
    acknowledged it (``detector.store.replication``): one the master applied but too few
    replicas took is owed too, and put (and waited for) again until they do.
    """

    def __init__(self, redis_client: Redis, wait: ReplicaWait | None = None) -> None:
        self._redis = redis_client
        self.wait = wait
        self._script = redis_client.register_script(lua("put_version"))
        # (series, version) → (version, move latest): puts still owed to Redis.
        self._owed: dict[tuple[str, int], tuple[ModelVersion, bool]] = {}
        self._task: asyncio.Task[None] | None = None

    @property
    def owed(self) -> int:
        """How many committed versions Redis has not confirmed yet."""
        return len(self._owed)

    async def put(self, found: ModelVersion, *, make_latest: bool) -> bool:
        """Write one version now; False (and a retry owed) when Redis did not confirm it."""
        return (await self.put_many([found], make_latest=make_latest)).unconfirmed == 0

    async def put_many(self, versions: Sequence[ModelVersion], *, make_latest: bool) -> PutOutcome:
        """Write versions now, pipelined (a bulk fit's batch in a round trip or two); returns
        how many Redis did not confirm, each owed and put again in the background, and the
        failure that stopped them."""
        items = [(found, make_latest) for found in versions]
        unconfirmed, exc = await self._put_many(items)
        if unconfirmed:
            first = unconfirmed[0][0]
            log.warning(
                "Redis did not confirm %s %s%s (%s); putting %s again in the background",
                first.series_id,
                first.name,
                f" and {len(unconfirmed) - 1} more versions" if len(unconfirmed) > 1 else "",
                exc,
                "them" if len(unconfirmed) > 1 else "it",
            )
            for found, latest in unconfirmed:
                self._owe(found, latest)
        return PutOutcome(len(unconfirmed), exc)

    async def _put_many(
        self, items: Sequence[tuple[ModelVersion, bool]]
    ) -> tuple[list[tuple[ModelVersion, bool]], BaseException | None]:
        """Put ``items`` (version, move latest) in pipelines of ``_PIPELINE`` scripts; returns
        those Redis did not confirm (from the first failure on) and the failure. Anything but
        Redis being unavailable is raised."""
        for start in range(0, len(items), _PIPELINE):
            chunk = items[start : start + _PIPELINE]
            try:
                replies = await self._pipeline(chunk)
                if any(isinstance(r, NoScriptError) for r in replies):  # restarted, flushed
                    await self._redis.script_load(self._script.script)
                    replies = await self._pipeline(chunk)
                failed = next((r for r in replies if isinstance(r, Exception)), None)
                if failed is not None:
                    raise failed
            except REDIS_FAILURES as exc:
                if not redis_unavailable(exc):
                    raise
                return list(items[start:]), exc
        return [], None

    async def _pipeline(self, chunk: Sequence[tuple[ModelVersion, bool]]) -> list[Any]:
        # EVALSHA by name: a cluster pipeline blocks its ``evalsha`` method, and routes the
        # command by its one key's slot all the same.
        commands = [
            (
                model_key(found.series_id),
                (
                    "EVALSHA",
                    self._script.sha,
                    1,
                    model_key(found.series_id),
                    found.version,
                    found.to_redis(),
                    1 if make_latest else 0,
                ),
            )
            for found, make_latest in chunk
        ]
        if self.wait is not None:
            # Each master's puts and their WAIT on one connection to it.
            return await write_then_wait_async(self._redis, commands, self.wait)
        async with self._redis.pipeline(transaction=False) as pipe:
            for _, args in commands:
                pipe.execute_command(*args)
            return list(await pipe.execute(raise_on_error=False))

    def _owe(self, found: ModelVersion, make_latest: bool) -> None:
        key = (found.series_id, found.version)
        earlier = self._owed.get(key)
        self._owed[key] = (found, make_latest or (earlier is not None and earlier[1]))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._repay(), name="redis-version-repair")

    async def _repay(self) -> None:
        delay = _RETRY_FIRST
        while self._owed:
            await asyncio.sleep(delay)
            owed = list(self._owed.items())
            unconfirmed, _ = await self._put_many([item for _, item in owed])
            done = owed[: len(owed) - len(unconfirmed)]
            for key, item in done:
                if self._owed.get(key) is item:  # not owed again meanwhile
                    del self._owed[key]
            if done:
                first = done[0][1][0]
                log.info(
                    "put %s %s%s into Redis after all",
                    first.series_id,
                    first.name,
                    f" and {len(done) - 1} more versions" if len(done) > 1 else "",
                )
            delay = min(_RETRY_MAX, delay * 2) if unconfirmed else _RETRY_FIRST

    async def settle(self, seconds: float) -> int:
        """Wait up to ``seconds`` for what is owed to be confirmed (a command line tool before
        it exits); returns how many versions are still owed."""
        task = self._task
        if task is not None and not task.done():
            await asyncio.wait([task], timeout=seconds)
        return len(self._owed)

    async def close(self) -> None:
        """Stop retrying (what is still owed is repaired by readers, from PostgreSQL)."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
