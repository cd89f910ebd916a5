"""Redis stream operations of the worker: the group, the atomic commit, claims, trimming, lag."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import redis.exceptions
from redis.asyncio import Redis
from redis.client import NEVER_DECODE

from detector.wire.readings import RawEntry

log = logging.getLogger(__name__)

# Commits a batch atomically. ARGV[4] is the batch's entry ids (space-separated), ARGV[5] the
# outputs of the entries that have one, as JSON [[id, kind, [field, value, ...]], ...] in entry
# order. For each entry still pending in the group (whoever owns it) its output is written, then
# it is acknowledged. An entry no longer pending was finished by another consumer that had
# claimed it: it is skipped, so no event is ever written twice. Outputs are written before the
# XACKs: if a write fails, nothing is acknowledged and the entries are delivered again
# (at-least-once) rather than lost.
#
# Pending-ness comes from one XPENDING range over the batch (ARGV[6]..ARGV[7]); an id the range
# did not show (another consumer's entries crowded it out, or it is really gone) is checked on
# its own, so the answer never depends on the range. The XACKs go 1000 ids a call.
_COMMIT = """
local group = ARGV[1]
local ids = {}
for id in string.gmatch(ARGV[4], '%S+') do
    ids[#ids + 1] = id
end
local live = {}
local window = #ids * 2 + 16
for _, p in ipairs(redis.call('XPENDING', KEYS[1], group, ARGV[6], ARGV[7], window)) do
    live[p[1]] = true
end
local acks = {}
for _, id in ipairs(ids) do
    if live[id] == nil then
        live[id] = #redis.call('XPENDING', KEYS[1], group, id, id, 1) > 0
    end
    if live[id] then
        acks[#acks + 1] = id
    end
end
local emitted = 0
for _, out in ipairs(cjson.decode(ARGV[5])) do
    if live[out[1]] then
        if out[2] == 'a' then
            redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', unpack(out[3]))
            emitted = emitted + 1
        elseif out[2] == 'd' then
            redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], '*', unpack(out[3]))
        end
    end
end
for i = 1, #acks, 1000 do
    redis.call('XACK', KEYS[1], group, unpack(acks, i, math.min(i + 999, #acks)))
end
return {#acks, emitted}
"""

# Entries not yet delivered to the group: the stream's length minus the entries up to the
# group's last-delivered id (Redis 6.2 has no `lag` in XINFO GROUPS). The worker trims
# `readings` below its oldest pending entry, so the counted range stays small.
_LAG = """
local delivered = #redis.call('XRANGE', KEYS[1], '-', ARGV[1], 'COUNT', ARGV[2])
return redis.call('XLEN', KEYS[1]) - delivered
"""

# Only a consumer with nothing pending may be deleted: its pending entries would become
# unclaimable (a known Redis pitfall).
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
    """What committing one entry writes besides its acknowledgement: an anomaly event ("a")
    or a dead letter ("d"); "" writes nothing."""

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
    # Raised inside a script (the commit's XPENDING, when FLUSHALL lands between our read and
    # our commit), Redis 6.2 wraps the error: "Error running script (…): @user_script:6:
    # NOGROUP No such key …". Missing that crashed the worker instead of recreating the group.
    return (
        text.startswith("NOGROUP") or ": NOGROUP " in text or text.lower().startswith("no such key")
    )


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
        # The same connections, but XREADGROUP and XAUTOCLAIM replies are left as Redis sent
        # them: flat field lists (redis-py's own parsing builds a dict per entry, the worker's
        # largest cost), and bytes (NEVER_DECODE), since a producer may have written anything;
        # decoding them is the wire codec's job, where bytes that are not UTF-8 become a dead
        # letter instead of an exception inside the reply parser on every read.
        self._raw = Redis(connection_pool=client.connection_pool)
        self._raw.set_response_callback("XREADGROUP", _as_sent)
        self._raw.set_response_callback("XAUTOCLAIM", _as_sent)
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

    async def read(
        self, consumer: str, from_id: str, count: int, *, block: int | None = None
    ) -> list[RawEntry]:
        """Up to ``count`` entries for ``consumer`` (``>``: new ones, waiting up to ``block``
        ms for some; an id: its pending ones after that id), fields as flat lists of bytes."""
        args: list[str | int] = ["GROUP", self.group, consumer, "COUNT", count]
        if block is not None:
            args += ["BLOCK", block]
        reply: Any = await self._raw.execute_command(  # type: ignore[no-untyped-call]
            "XREADGROUP", *args, "STREAMS", self.readings, from_id, **{NEVER_DECODE: True}
        )
        if not reply:
            return []
        if isinstance(reply, dict):  # RESP3: {stream: [[id, fields], ...]}
            entries = next(iter(reply.values()))
        else:  # RESP2: [[stream, [[id, fields], ...]]]
            entries = reply[0][1]
        return [(entry[0].decode(), entry[1] or None) for entry in entries]

    async def claim(
        self, consumer: str, min_idle_ms: int, cursor: str, count: int
    ) -> tuple[str, list[RawEntry]]:
        """XAUTOCLAIM: up to ``count`` entries idle over ``min_idle_ms`` from ``cursor`` on,
        now ``consumer``'s; returns the next cursor ("0-0" after a full pass) and the entries,
        fields as flat lists of bytes (None for an entry deleted while pending)."""
        reply: Any = await self._raw.execute_command(  # type: ignore[no-untyped-call]
            "XAUTOCLAIM",
            self.readings,
            self.group,
            consumer,
            min_idle_ms,
            cursor,
            "COUNT",
            count,
            **{NEVER_DECODE: True},
        )
        entries: list[RawEntry] = [
            (entry[0].decode(), entry[1] or None)
            for entry in reply[1]
            if entry is not None and entry[0] is not None
        ]
        return reply[0].decode(), entries

    async def commit(self, entry_ids: Sequence[str], outputs: Sequence[Output]) -> tuple[int, int]:
        """Acknowledge ``entry_ids`` and write the ``outputs`` (events and dead letters of some
        of them, in entry order) in one atomic script.

        Returns (entries committed, events emitted); entries another consumer had already
        committed are not counted.
        """
        if not entry_ids:
            return 0, 0
        payload = orjson.dumps(
            [[out.source_id, out.kind, _flatten(out.fields or {})] for out in outputs]
        ).decode()
        # Entries come in stream order (XREADGROUP, XAUTOCLAIM), so the ends bound the range;
        # were they not, the script's single checks would still decide correctly.
        first, last = sorted((entry_ids[0], entry_ids[-1]), key=parse_id)
        committed, emitted = await self._commit(
            keys=[self.readings, self.anomalies, self.dead],
            args=[
                self.group,
                self.anomalies_maxlen,
                self.dead_maxlen,
                " ".join(entry_ids),
                payload,
                first,
                last,
            ],
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


def _as_sent(response: Any, **options: Any) -> Any:
    return response


def _flatten(fields: dict[str, str]) -> list[str]:
    flat: list[str] = []
    for name, value in list(fields.items())[:MAX_DEAD_FIELDS]:
        flat += (name, value)
    return flat
