"""The worker's view of each series' feedback adjustment (``feedback:{<series_id>}``).

The API writes a series' adjustment to Redis whenever its feedback changes
(``detector.store.feedback``); a worker re-reads a series' key once its cached entry is
``ttl`` seconds old (``MODEL_REFRESH_SECONDS``, as for the latest-version pointers), so new
feedback is in force on every worker within that time plus one batch. A series without
feedback has no key and keeps the version's own thresholds.

What a worker hands the kind is ``Adjustment.vector()`` (() for none), read from the hash's
``adjustment`` field; a hash written before that field existed has only the three static
scales, which are read as such.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

import orjson
from redis.asyncio import Redis

from detector.feedback import TESTS, Adjustment
from detector.redis_keys import feedback_key
from detector.store.fields import HashReads

log = logging.getLogger(__name__)

Scales = tuple[float, ...]
FIELDS = ("adjustment", *TESTS)


def _parse(raw: list[bytes | str | None]) -> Scales:
    adjustment, *scales = raw
    try:
        if adjustment is not None:
            return Adjustment.from_dict(orjson.loads(adjustment)).vector()
        if all(v is not None for v in scales):
            return Adjustment.from_scales([float(v) for v in scales]).vector()  # type: ignore[arg-type]
    except (ValueError, TypeError, orjson.JSONDecodeError) as exc:
        log.warning("an unreadable feedback adjustment is ignored: %s", exc)
    return ()


class Adjustments:
    """Per-series adjustment vectors, each re-read from Redis at most every ``ttl`` seconds."""

    def __init__(
        self, client: Redis, ttl: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.redis = client
        self.ttl = ttl
        self.clock = clock
        self._entries: dict[str, tuple[Scales, float]] = {}
        self._read = HashReads(client)

    async def resolve(self, series_ids: Iterable[str]) -> dict[str, Scales]:
        """The adjustment vector of each series, the stale entries read in one call
        (``HashReads``: a series without feedback has no key, answered as such)."""
        now = self.clock()
        wanted = list(series_ids)
        stale = [s for s in wanted if (e := self._entries.get(s)) is None or e[1] <= now]
        if stale:
            replies = await self._read([feedback_key(s) for s in stale], FIELDS)
            for series_id, raw in zip(stale, replies, strict=True):
                self._entries[series_id] = (() if raw is None else _parse(raw), now + self.ttl)
            if len(self._entries) > 4 * max(len(wanted), 50_000):  # bound the memory
                self._entries = {k: v for k, v in self._entries.items() if v[1] > now}
        return {s: self._entries[s][0] for s in wanted}
