"""The worker's cache of each series' latest model version, trusted for a bounded time."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from detector.errors import ModelNotFoundError
from detector.redis_keys import model_key
from detector.store.models import ModelStore

_PRUNE_AT = 200_000


class LatestVersions:
    """Which version is the latest, per series, re-read from Redis at most every ``ttl`` s.

    Invalidation is by time alone: a refit moves the series' `latest` pointer in Redis (once
    PostgreSQL has committed it, so a pointer never names an uncommitted version), and every
    worker re-reads a pointer once its entry is ``ttl`` seconds old, so a refit is used within
    ``ttl`` plus one batch. Versions themselves are immutable, so the (series, version) model
    cache in ``ModelStore`` never goes stale.
    "No model yet" is cached the same way, so a series with no model costs one lookup per
    ``ttl``, not one per reading.
    """

    def __init__(
        self, store: ModelStore, ttl: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.store = store
        self.ttl = ttl
        self.clock = clock
        self._entries: dict[str, tuple[int | None, float]] = {}

    async def resolve(self, series_ids: Iterable[str]) -> dict[str, int | None]:
        """The latest version of each series (None: no model), one Redis round trip for all
        stale entries."""
        now = self.clock()
        wanted = set(series_ids)
        stale = [s for s in wanted if (e := self._entries.get(s)) is None or e[1] <= now]
        if stale:
            if len(self._entries) > _PRUNE_AT:
                self._entries = {k: v for k, v in self._entries.items() if v[1] > now}
            async with self.store.redis.pipeline(transaction=False) as pipe:
                for series_id in stale:
                    pipe.hget(model_key(series_id), "latest")
                pointers = await pipe.execute()
            for series_id, raw in zip(stale, pointers, strict=True):
                version: int | None
                if raw is not None:
                    version = int(raw)
                else:  # not in Redis: PostgreSQL decides (and the store repairs Redis)
                    try:
                        version = await self.store.latest_version(series_id)
                    except ModelNotFoundError:
                        version = None
                self._entries[series_id] = (version, now + self.ttl)
        return {s: self._entries[s][0] for s in wanted}
