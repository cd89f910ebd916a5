"""Fields of many hashes, in as few round trips as the deployment allows."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from redis.asyncio import Redis

from detector.scripts import KEYS_A_CALL, lua
from detector.store.connections import is_cluster


class _ManyKeyReads:
    """What ``FieldReads`` and ``HashReads`` share: the client, whether it is a cluster, and
    their script run over ``KEYS_A_CALL`` keys at a time (one Redis)."""

    script = ""  # the ``detector/scripts`` file each one runs on one Redis

    def __init__(self, client: Redis) -> None:
        self.redis = client
        self._cluster = is_cluster(client)
        self._script = client.register_script(lua(self.script))

    async def _scripted(
        self, keys: Sequence[str], args: Callable[[int, int], Sequence[str]]
    ) -> list[Any]:
        """The script's replies over ``keys``, a call a ``KEYS_A_CALL`` of them, each given
        ``args(start, end)`` for its keys ``keys[start:end]``."""
        replies: list[Any] = []
        for start in range(0, len(keys), KEYS_A_CALL):
            end = start + KEYS_A_CALL
            replies += await self._script(keys=keys[start:end], args=args(start, end))
        return replies


class FieldReads(_ManyKeyReads):
    """``HGET key field`` for many (key, field) pairs: on one Redis one script call a
    ``KEYS_A_CALL`` keys (``read_models.lua``: a pipeline of one HGET a key costs the client
    a command to pack and a reply to parse each); on Redis Cluster, where a script's keys
    must share a slot and these are many series' (one slot each), one non-transactional
    pipeline, which the cluster client splits into one round trip a master. Replies come in
    the pairs' order, None for a missing field."""

    script = "read_models"

    async def __call__(self, keys: Sequence[str], fields: Sequence[str]) -> list[Any]:
        if self._cluster:
            async with self.redis.pipeline(transaction=False) as pipe:
                for key, name in zip(keys, fields, strict=True):
                    pipe.hget(key, name)
                return list(await pipe.execute())
        return await self._scripted(keys, lambda start, end: fields[start:end])


class HashReads(_ManyKeyReads):
    """``HMGET key *fields`` for many keys (the same fields of each), split as
    ``FieldReads``: one script call a ``KEYS_A_CALL`` keys on one Redis
    (``read_hashes.lua``), one non-transactional pipeline on Redis Cluster. Replies come in
    the keys' order: the fields' values (None for a missing field), or None for a key that
    does not exist."""

    script = "read_hashes"

    async def __call__(self, keys: Sequence[str], fields: Sequence[str]) -> list[Any]:
        if self._cluster:
            async with self.redis.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.hmget(key, *fields)
                replies = await pipe.execute()
            return [None if all(v is None for v in row) else row for row in replies]
        return await self._scripted(keys, lambda start, end: fields)
