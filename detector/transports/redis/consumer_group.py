"""Redis stream operations of the worker: the group, the atomic commit, claims, trimming, lag."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import orjson
import redis.exceptions
from redis.asyncio import Redis
from redis.client import NEVER_DECODE

from detector.redis_keys import attempts_key
from detector.scripts import lua
from detector.store.connections import is_cluster
from detector.wire.readings import RawEntry

log = logging.getLogger(__name__)


_LAG_COUNT_CAP = 50_000
# A suspect's attempt count outlives any redelivery cycle, then goes (bounded memory).
_ATTEMPTS_TTL_SECONDS = 86_400
# Lua's unpack() has a stack limit; a dead letter keeps at most this many original fields.
MAX_DEAD_FIELDS = 200


@dataclass(frozen=True, slots=True)
class Output:
    """What committing one entry writes besides its acknowledgement: an anomaly event ("a"),
    a `no_data` event ("n", the entry closed a silence) or a dead letter ("d"); "" writes
    nothing."""

    source_id: str
    kind: str = ""
    fields: dict[str, str] | None = None


def parse_id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


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
        raw: Redis,
    ) -> None:
        self.redis = client
        self.readings, self.anomalies, self.dead, self.group = readings, anomalies, dead, group
        self.anomalies_maxlen, self.dead_maxlen = anomalies_maxlen, dead_maxlen
        self.attempts = attempts_key(readings)
        self._commit = client.register_script(lua("trim_finished") + lua("commit_batch"))
        # The same connections, but XREADGROUP and XAUTOCLAIM replies are left as Redis sent
        # them: flat field lists (redis-py's own parsing builds a dict per entry, the worker's
        # largest cost), and bytes (NEVER_DECODE), since a producer may have written anything;
        # decoding them is the wire codec's job, where bytes that are not UTF-8 become a dead
        # letter instead of an exception inside the reply parser on every read. ``raw``: such
        # a client (``connections.reply_twin``).
        self.raw = raw
        self.raw.set_response_callback("XREADGROUP", _as_sent)
        self.raw.set_response_callback("XAUTOCLAIM", _as_sent)
        self._cluster = is_cluster(client)
        self._lag = client.register_script(lua("consumer_lag"))
        self._trim = client.register_script(
            lua("trim_finished") + "return trim_finished(KEYS[1])\n"
        )
        self._delete_idle_consumer = client.register_script(lua("delete_idle_consumer"))

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
        reply: Any = await self.raw.execute_command(  # type: ignore[no-untyped-call]
            "XREADGROUP", *args, "STREAMS", self.readings, from_id, **self._options()
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
        reply: Any = await self.raw.execute_command(  # type: ignore[no-untyped-call]
            "XAUTOCLAIM",
            self.readings,
            self.group,
            consumer,
            min_idle_ms,
            cursor,
            "COUNT",
            count,
            **self._options(),
        )
        entries: list[RawEntry] = [
            (entry[0].decode(), entry[1] or None)
            for entry in reply[1]
            if entry is not None and entry[0] is not None
        ]
        return reply[0].decode(), entries

    def _options(self) -> dict[str, Any]:
        """Raw replies; on a cluster, sent to the master of the stream's slot: a cluster client
        finds XREADGROUP's keys by asking a node (``COMMAND GETKEYS``), a round trip more a
        read, and one to a dead node after a failover (``connections.reread_layout``)."""
        if not self._cluster:
            return {NEVER_DECODE: True}
        node = cast(Any, self.raw).get_node_from_key(self.readings)
        return {NEVER_DECODE: True, "target_nodes": node}

    async def commit(
        self, entry_ids: Sequence[str], outputs: Sequence[Output]
    ) -> tuple[int, int, int]:
        """Acknowledge ``entry_ids`` and write the ``outputs`` (events and dead letters of some
        of them, in entry order) in one atomic script.

        Returns (entries committed, anomaly events emitted, no_data events emitted); entries
        another consumer had already committed are not counted.
        """
        if not entry_ids:
            return 0, 0, 0
        payload = orjson.dumps(
            [[out.source_id, out.kind, _flatten(out.fields or {})] for out in outputs]
        ).decode()
        # Entries come in stream order (XREADGROUP, XAUTOCLAIM), so the ends bound the range;
        # were they not, the script's single checks would still decide correctly.
        first, last = sorted((entry_ids[0], entry_ids[-1]), key=parse_id)
        committed, emitted, noticed = await self._commit(
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
        return int(committed), int(emitted), int(noticed)

    async def delivery_counts(self, consumer: str, ids: Sequence[str]) -> dict[str, int]:
        """How many times each of ``ids`` (pending for ``consumer``) has been delivered."""
        if not ids:
            return {}
        ordered = sorted(ids, key=parse_id)
        rows = await self.redis.xpending_range(
            self.readings, self.group, ordered[0], ordered[-1], len(ordered) * 2 + 10, consumer
        )
        return {str(row["message_id"]): int(row["times_delivered"]) for row in rows}

    async def count_attempt(self, entry_id: str) -> int:
        """Count one more attempt at processing ``entry_id`` alone; returns the count."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hincrby(self.attempts, entry_id, 1)
            pipe.expire(self.attempts, _ATTEMPTS_TTL_SECONDS)
            count, _ = await pipe.execute()
        return int(count)

    async def forget_attempt(self, entry_id: str) -> None:
        await self.redis.hdel(self.attempts, entry_id)

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
        delivered), in one script; returns the MINID used, None when nothing may be trimmed.

        Each commit trims too; this call covers what other groups finished meanwhile.
        """
        minid = await self._trim(keys=[self.readings])
        return str(minid) if minid else None

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
