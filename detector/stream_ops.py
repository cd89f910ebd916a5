"""Redis stream operations of the worker: the group, the atomic commit, claims, trimming, lag."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import redis.exceptions
from redis.asyncio import Redis

log = logging.getLogger(__name__)

# Commits a batch atomically. For each entry still pending in the group (whoever owns it) its
# outputs are written, then it is acknowledged. An entry no longer pending was finished by
# another consumer that had claimed it: it is skipped, so no event is ever written twice.
# Outputs are written before the XACKs: if a write fails, nothing is acknowledged and the
# entries are delivered again (at-least-once) rather than lost.
_COMMIT = """
local group = ARGV[1]
local entries = cjson.decode(ARGV[4])
local live = {}
for i, entry in ipairs(entries) do
    if #redis.call('XPENDING', KEYS[1], group, entry[1], entry[1], 1) > 0 then
        live[#live + 1] = entry
    end
end
local emitted = 0
for _, entry in ipairs(live) do
    local kind = entry[2]
    if kind == 'a' then
        redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', unpack(entry[3]))
        emitted = emitted + 1
    elseif kind == 'd' then
        redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], '*', unpack(entry[3]))
    end
end
for _, entry in ipairs(live) do
    redis.call('XACK', KEYS[1], group, entry[1])
end
return {#live, emitted}
"""

# Entries not yet delivered to the group: the stream's length minus the entries up to the
# group's last-delivered id (Redis 6.2 has no `lag` in XINFO GROUPS). The worker trims
# `readings` below its oldest pending entry, so the counted range stays small.
_LAG = """
local delivered = #redis.call('XRANGE', KEYS[1], '-', ARGV[1], 'COUNT', ARGV[2])
return redis.call('XLEN', KEYS[1]) - delivered
"""

# Only a consumer with nothing pending may be deleted: its pending entries would become
# unclaimable (DESIGN "Known pitfalls").
_DELETE_IDLE_CONSUMER = """
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) == 0 then
    return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
end
return -1
"""

_LAG_COUNT_CAP = 50_000
# Lua's unpack() has a stack limit; a dead letter keeps at most this many original fields.
MAX_DEAD_FIELDS = 200


@dataclass(frozen=True, slots=True)
class Output:
    """What committing one entry writes: an anomaly event ("a"), a dead letter ("d") or
    nothing but the acknowledgement ("")."""

    source_id: str
    kind: str = ""
    fields: dict[str, str] | None = None


def parse_id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def next_id(entry_id: str) -> str:
    ms, seq = parse_id(entry_id)
    return f"{ms}-{seq + 1}"


def is_nogroup(exc: redis.exceptions.ResponseError) -> bool:
    """The stream or its group is gone (FLUSHALL, DEL): XREADGROUP says NOGROUP, XINFO says
    no such key."""
    text = str(exc)
    return text.startswith("NOGROUP") or text.lower().startswith("no such key")


class StreamOps:
    """The Redis side of one worker: one `readings` stream, its group, and the output streams."""

    def __init__(
        self,
        client: Redis,
        *,
        readings: str,
        anomalies: str,
        dead: str,
        group: str,
        anomalies_maxlen: int,
        dead_maxlen: int,
    ) -> None:
        self.redis = client
        self.readings, self.anomalies, self.dead, self.group = readings, anomalies, dead, group
        self.anomalies_maxlen, self.dead_maxlen = anomalies_maxlen, dead_maxlen
        self._commit = client.register_script(_COMMIT)
        self._lag = client.register_script(_LAG)
        self._delete_idle_consumer = client.register_script(_DELETE_IDLE_CONSUMER)

    async def ensure_group(self) -> bool:
        """Create the group (and the stream) if missing; True when it was created.

        A new group starts at id 0: readings published before any worker existed, or after
        a FLUSHALL wiped the group, are still scored.
        """
        try:
            await self.redis.xgroup_create(self.readings, self.group, id="0", mkstream=True)
        except redis.exceptions.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
            return False
        return True

    async def commit(self, outputs: Sequence[Output]) -> tuple[int, int]:
        """Write the outputs and acknowledge their entries in one atomic script.

        Returns (entries committed, events emitted); entries another consumer had already
        committed are not counted.
        """
        if not outputs:
            return 0, 0
        payload = orjson.dumps(
            [
                [out.source_id, out.kind, _flatten(out.fields) if out.fields else []]
                for out in outputs
            ]
        ).decode()
        committed, emitted = await self._commit(
            keys=[self.readings, self.anomalies, self.dead],
            args=[self.group, self.anomalies_maxlen, self.dead_maxlen, payload],
        )
        return int(committed), int(emitted)

    async def delivery_counts(self, consumer: str, ids: Sequence[str]) -> dict[str, int]:
        """How many times each of ``ids`` (pending for ``consumer``) has been delivered."""
        if not ids:
            return {}
        ordered = sorted(ids, key=parse_id)
        rows = await self.redis.xpending_range(
            self.readings, self.group, ordered[0], ordered[-1], len(ordered) * 2 + 10, consumer
        )
        return {str(row["message_id"]): int(row["times_delivered"]) for row in rows}

    async def pending_count(self) -> int:
        summary: dict[str, Any] = await self.redis.xpending(self.readings, self.group)
        return int(summary["pending"])

    async def lag(self) -> int:
        """Entries not yet delivered to the group (capped counting, see ``_LAG``)."""
        for group in await self.redis.xinfo_groups(self.readings):
            if group["name"] == self.group:
                return max(
                    0,
                    int(
                        await self._lag(
                            keys=[self.readings],
                            args=[group["last-delivered-id"], _LAG_COUNT_CAP],
                        )
                    ),
                )
        return 0

    async def trim_readings(self) -> str | None:
        """Trim `readings` below the oldest entry any group still needs (pending, or not yet
        delivered); returns the MINID used, None when nothing may be trimmed.

        Every group's pending list and last-delivered id only move forward, so a bound read
        here can only be conservative by the time XTRIM runs.
        """
        bounds: list[str] = []
        for group in await self.redis.xinfo_groups(self.readings):
            summary = await self.redis.xpending(self.readings, group["name"])
            if summary["pending"]:
                bounds.append(str(summary["min"]))
            else:
                bounds.append(next_id(str(group["last-delivered-id"])))
        if not bounds:
            return None
        minid = min(bounds, key=parse_id)
        if parse_id(minid) <= (0, 1):
            return None
        await self.redis.xtrim(self.readings, minid=minid, approximate=True)
        return minid

    async def delete_consumer_if_idle(self, consumer: str) -> bool:
        deleted = await self._delete_idle_consumer(
            keys=[self.readings], args=[self.group, consumer]
        )
        return int(deleted) >= 0


def _flatten(fields: dict[str, str]) -> list[str]:
    flat: list[str] = []
    for name, value in list(fields.items())[:MAX_DEAD_FIELDS]:
        flat += (name, value)
    return flat
