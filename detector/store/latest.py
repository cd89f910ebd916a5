"""The worker's cache of each series' latest model version, trusted for a bounded time."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from operator import itemgetter

from detector.errors import ModelNotFoundError
from detector.redis_keys import model_key
from detector.store.fields import FieldReads
from detector.store.models import ModelStore


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
        # No entry expires before this (a lower bound): until then, a batch whose series are
        # all known needs no look at each entry's age.
        self._fresh_until = math.inf
        self._read = FieldReads(store.redis)

    async def resolve(self, series_ids: Iterable[str]) -> dict[str, int | None]:
        """The latest version of each series (None: no model), one Redis round trip for all
        stale entries."""
        now = self.clock()
        wanted = series_ids if isinstance(series_ids, dict) else dict.fromkeys(series_ids)
        expired = now >= self._fresh_until
        if not expired and not wanted.keys() - self._entries.keys():
            stale: list[str] = []
        else:
            stale = [s for s in wanted if (e := self._entries.get(s)) is None or e[1] <= now]
        if stale:
            pointers = await self._read([model_key(s) for s in stale], ["latest"] * len(stale))
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
        found = dict(
            zip(wanted, map(_VERSION, map(self._entries.__getitem__, wanted)), strict=True)
        )
        if expired or (stale and self._fresh_until == math.inf):
            # Entries added later expire after every older one, so the bound moves only once
            # the oldest expired: then the expired ones are dropped (the next batch that wants
            # one reads it again; with a ttl of 0 that is every entry), which also bounds the
            # memory. The answer was taken first.
            self._entries = {k: v for k, v in self._entries.items() if v[1] > now}
            self._fresh_until = min((e[1] for e in self._entries.values()), default=math.inf)
        return found


_VERSION = itemgetter(0)
