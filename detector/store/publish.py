"""Copying committed model versions into Redis: the one writer of the model hashes."""

from __future__ import annotations

import asyncio
import logging

from redis.asyncio import Redis

from detector.errors import REDIS_FAILURES, redis_unavailable
from detector.redis_keys import model_key
from detector.scripts import lua
from detector.store.codec import ModelVersion

log = logging.getLogger(__name__)


_RETRY_FIRST = 0.5
_RETRY_MAX = 5.0


class VersionPublisher:
    """Puts versions PostgreSQL has committed into Redis, and only those.

    A put that fails or gets no clear answer (a timeout, a reset connection) may or may not
    have reached Redis; either way the version is durable, so it is kept and put again in the
    background until Redis confirms it. The put is idempotent and moves ``latest`` forward
    only, so repeating it, or repeating it after a newer version, changes nothing.
    """

    def __init__(self, redis_client: Redis) -> None:
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
        try:
            await self._put(found, make_latest)
        except REDIS_FAILURES as exc:
            if not redis_unavailable(exc):
                raise
            log.warning(
                "Redis did not confirm %s %s (%s); putting it again in the background",
                found.series_id,
                found.name,
                exc,
            )
            self._owe(found, make_latest)
            return False
        return True

    async def _put(self, found: ModelVersion, make_latest: bool) -> None:
        await self._script(
            keys=[model_key(found.series_id)],
            args=[found.version, found.to_redis(), 1 if make_latest else 0],
        )

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
            for key, (found, make_latest) in list(self._owed.items()):
                try:
                    await self._put(found, make_latest)
                except REDIS_FAILURES as exc:
                    if not redis_unavailable(exc):
                        raise
                    delay = min(_RETRY_MAX, delay * 2)
                    break
                self._owed.pop(key, None)
                log.info("put %s %s into Redis after all", found.series_id, found.name)
            else:
                delay = _RETRY_FIRST

    async def close(self) -> None:
        """Stop retrying (what is still owed is repaired by readers, from PostgreSQL)."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
