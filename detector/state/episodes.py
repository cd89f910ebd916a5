"""Anomaly episodes: consecutive anomalies of a series grouped atomically in Redis."""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

from redis.asyncio import Redis

from detector.redis_keys import episode_key
from detector.scripts import lua


@dataclass(frozen=True, slots=True)
class Assignment:
    """A reading's episode: its id, whether the reading opened it, and whether that happened
    in this call (an episode opened for the first time, not a redelivery of its opener)."""

    episode_id: str
    onset: bool
    opened: bool


class EpisodeTracker:
    """Groups anomalous readings into episodes with one atomic script call per batch.

    Only anomalous readings reach Redis; a batch without any costs nothing. Several workers on
    one group are safe (each batch's assignment is one atomic script), readings of a series may
    arrive out of order (the rule is in ``detector/scripts/assign_episodes.lua``), and a
    redelivered reading gets the same episode id and onset again. Memory: one small hash per
    series that ever had an anomaly (the current episode and ``history`` closed ones, ~50
    bytes each).
    """

    def __init__(
        self, client: Redis, *, quiet_seconds: int, history: int = 8, namespace: str = ""
    ) -> None:
        self.quiet_seconds = quiet_seconds
        self.history = history
        self.namespace = namespace  # ``redis_keys.episode_key``'s: a backfill job's own
        self._assign = client.register_script(lua("assign_episodes"))

    async def assign_readings(self, readings: list[tuple[str, int, str]]) -> list[Assignment]:
        """Assign (series_id, timestamp, source_id) readings, in the given order."""
        if not readings:
            return []
        keys: dict[str, int] = {}
        lines = []
        for series_id, timestamp, source_id in readings:
            index = keys.setdefault(episode_key(series_id, self.namespace), len(keys) + 1)
            lines.append(f"{index} {int(timestamp)} {source_id}")
        reply = await self._assign(
            keys=list(keys), args=[self.quiet_seconds, self.history, "\n".join(lines)]
        )
        flat = [r.decode() if isinstance(r, bytes) else str(r) for r in reply]
        return [
            Assignment(flat[i], flat[i + 1] != "0", flat[i + 1] in ("1", "3"))
            for i in range(0, len(flat), 2)
        ]

    async def assign(self, events: Mapping[str, MutableMapping[str, str]]) -> int:
        """Add ``episode_id`` and ``onset`` ("1" or "0") to anomaly events (source id →
        fields, in batch order) that have none yet; returns how many episodes were opened for
        the first time."""
        # Events of a kind that groups its own alerts (multiscale) already carry them.
        ordered = [(i, e) for i, e in events.items() if "episode_id" not in e]
        if not ordered:
            return 0
        found = await self.assign_readings(
            [(e["series_id"], int(e["timestamp"]), source_id) for source_id, e in ordered]
        )
        opened = 0
        for (_, fields), assignment in zip(ordered, found, strict=True):
            fields["episode_id"] = assignment.episode_id
            fields["onset"] = "1" if assignment.onset else "0"
            opened += assignment.opened
        return opened
