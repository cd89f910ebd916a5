"""Confirming writes on replicas (``REDIS_WAIT_REPLICAS``): Redis' ``WAIT``, sent on the very
connection that made the writes.

Redis replicates asynchronously: a master answers a write before any replica has it, so a
write acknowledged just before the master dies may be missing on the replica promoted in its
place. ``WAIT n timeout`` blocks until ``n`` replicas have acknowledged every write the
*calling connection* made, or the timeout passes, and returns how many did. Two things follow:

- it has to follow the writes on the same connection, not merely the same node: another
  connection's earlier writes may be long replicated, so its ``WAIT`` would answer at once for
  writes it never made. The writes and the ``WAIT`` therefore go in one pipeline on one
  connection (a pooled ``WAIT`` sent after them could take any connection);
- on a Redis Cluster it must go to the master that made the writes. redis-py's cluster
  client sends a bare ``WAIT`` to its default node (a keyless command) and sums the replies
  of the nodes it was sent to, neither of which means anything here. So the pipeline goes to
  the master of the writes' slot, through that node's own connection pool, and a write
  refused there (``MOVED``: the slot has another master now) counts as not done; the caller
  re-reads the layout (``connections.reread_layout_sync``) and sends it again, which only
  idempotent writes allow (every write sent this way is).

Even a confirmed write is not safe from everything: ``WAIT`` does not make a replica persist
it, and of a master's several replicas one that did not acknowledge can still be the one
promoted (Redis prefers the most up-to-date). What it removes is the silent loss: a write too
few replicas acknowledged fails loudly instead of reporting success.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import redis
import redis.cluster
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, PipelineCommand, RedisCluster
from redis.exceptions import AskError, ClusterDownError, MovedError, TryAgainError

from detector.errors import NotReplicatedError
from detector.store.connections import is_cluster

if TYPE_CHECKING:
    from detector.settings import Settings

# Replies meaning the slot is elsewhere or in transition: the layout is stale, not the write
# wrong (re-read the layout, send again).
LAYOUT_CHANGED = (MovedError, AskError, TryAgainError, ClusterDownError)

# A lost master or a moved slot: what makes the layout worth reading again.
_STALE_LAYOUT = (
    *LAYOUT_CHANGED,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    OSError,
)

Command = Sequence[str | int | float | bytes]


@dataclass(frozen=True, slots=True)
class ReplicaWait:
    """``WAIT replicas timeout_ms`` after each write of the publisher and of a fit."""

    replicas: int
    timeout_ms: int

    @classmethod
    def from_settings(cls, settings: Settings) -> ReplicaWait | None:
        """The settings' wait, or None when REDIS_WAIT_REPLICAS is 0 (the default)."""
        if settings.redis_wait_replicas <= 0:
            return None
        return cls(settings.redis_wait_replicas, settings.redis_wait_timeout_ms)

    def check(self, acknowledged: Any) -> None:
        """Raise NotReplicatedError unless ``acknowledged`` (WAIT's reply) is enough."""
        if isinstance(acknowledged, Exception):
            raise acknowledged
        if int(acknowledged) < self.replicas:
            raise NotReplicatedError(
                f"only {int(acknowledged)} of the {self.replicas} replicas asked for"
                f" acknowledged it within {self.timeout_ms} ms (REDIS_WAIT_TIMEOUT_MS); the"
                " master applied it, so a failover now could lose it"
            )

    def command(self) -> tuple[str, int, int]:
        return ("WAIT", self.replicas, self.timeout_ms)


def write_then_wait(
    client: redis.Redis, key: str, commands: Sequence[Command], wait: ReplicaWait
) -> tuple[list[Any], Any]:
    """Send ``commands`` (of ``key``'s slot) then WAIT in one pipeline on one connection to
    the master of that slot; returns the commands' replies (errors as exception objects) and
    WAIT's. Raises what the connection raises (lost, refused)."""
    target = client
    if is_cluster(client):
        cluster = cast(redis.cluster.RedisCluster, client)
        node = cluster.get_node_from_key(key)  # type: ignore[no-untyped-call]
        target = cluster.get_redis_connection(node)
    with target.pipeline(transaction=False) as pipe:
        for args in commands:
            pipe.execute_command(*args)  # type: ignore[no-untyped-call]
        pipe.execute_command(*wait.command())  # type: ignore[no-untyped-call]
        replies = list(pipe.execute(raise_on_error=False))
    return replies[:-1], replies[-1]


async def write_then_wait_async(
    client: Redis, writes: Sequence[tuple[str, Command]], wait: ReplicaWait
) -> list[Any]:
    """``write_then_wait`` for the asyncio client and writes of many keys: ``writes`` are
    (key, command) pairs; on a cluster they are grouped by their slot's master, each group
    sent with its WAIT on one connection to that master, the groups at once. Returns one reply
    a write, in order: its own, or NotReplicatedError when its group's WAIT fell short, or the
    exception that failed its group (a lost connection)."""
    if not is_cluster(client):
        async with client.pipeline(transaction=False) as pipe:
            for _, args in writes:
                pipe.execute_command(*args)
            pipe.execute_command(*wait.command())
            try:
                replies = list(await pipe.execute(raise_on_error=False))
            except Exception as exc:  # handed back per write, as documented
                return [exc] * len(writes)
        return _with_wait(replies[:-1], replies[-1], wait)
    cluster = cast(RedisCluster, client)
    await cluster.initialize()  # re-reads the layout when a failure asked for it
    groups: dict[str, tuple[ClusterNode, list[int]]] = {}
    for i, (key, _) in enumerate(writes):
        node = cluster.get_node_from_key(key)
        if node is None:  # only asked of replicas
            raise RuntimeError(f"no master serves the slot of {key}")
        groups.setdefault(node.name, (node, []))[1].append(i)
    results: list[Any] = [None] * len(writes)

    async def send(node: ClusterNode, indices: list[int]) -> None:
        sent = [PipelineCommand(n, *writes[i][1]) for n, i in enumerate(indices)]
        sent.append(PipelineCommand(len(indices), *wait.command()))
        try:
            await node.execute_pipeline(sent)
        except Exception as exc:  # handed back per write, as documented
            for i in indices:
                results[i] = exc
            return
        replies = _with_wait([c.result for c in sent[:-1]], sent[-1].result, wait)
        for i, reply in zip(indices, replies, strict=True):
            results[i] = reply

    await asyncio.gather(*(send(node, indices) for node, indices in groups.values()))
    if any(isinstance(r, _STALE_LAYOUT) for r in results):
        # The cluster client's own flag for "read the layout before the next command", as it
        # sets it itself after a lost connection; ``initialize`` above then reads it.
        cluster._initialize = True
    return results


def _with_wait(replies: list[Any], acknowledged: Any, wait: ReplicaWait) -> list[Any]:
    """The replies, each successful one replaced by NotReplicatedError when WAIT fell short."""
    try:
        wait.check(acknowledged)
    except Exception as exc:  # handed back per write
        return [r if isinstance(r, Exception) else exc for r in replies]
    return replies
