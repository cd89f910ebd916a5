"""Opening the Redis client and the PostgreSQL pool, and applying the schema."""

from __future__ import annotations

import logging
import math
import time
from importlib import resources
from typing import cast

import psycopg
import redis
import redis.cluster
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError, TimeoutError

from detector.errors import NotOnClusterError
from detector.settings import Settings

log = logging.getLogger(__name__)

# Any constant works; it only has to be the same in every process applying the schema.
_SCHEMA_LOCK = 0x616E6F6D


def redis_client(settings: Settings) -> Redis:
    """A Redis client; socket timeouts stay above any blocking stream read we issue.

    A pooled connection that a Redis restart has cut is only found dead when it is next used:
    one quick retry on a fresh connection turns that into a success instead of a 503. Every
    command we send through this client is safe to repeat (reads, HSET of an immutable
    version, a forward-only pointer move, and stream commits that skip what is already done).
    """
    if settings.redis_cluster_nodes:
        return _cluster_client(settings)
    return Redis.from_url(
        settings.redis_connection_url(),
        decode_responses=True,
        socket_connect_timeout=2.0,
        socket_timeout=10.0,
        health_check_interval=30,
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), retries=2),
        retry_on_error=[ConnectionError, TimeoutError],
    )


def _cluster_client(settings: Settings) -> Redis:
    """A Redis Cluster client (REDIS_CLUSTER_NODES), with the single-node client's timeouts.

    It answers every command the services send as the single-node client does, routing each
    by its keys' slot (a script's keys must share one: ``detector.redis_keys``), so it is
    typed as one: the callers keep one type, and the few places that must know ask
    ``is_cluster``. A moved slot (a MOVED or ASK reply) is followed by the client itself,
    which then re-reads the cluster's layout.
    """
    client = RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in settings.redis_cluster_seeds()],
        username=settings.redis_username,
        password=settings.redis_password,
        decode_responses=True,
        socket_connect_timeout=2.0,
        socket_timeout=10.0,
        health_check_interval=30,
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), retries=2),
    )
    return cast(Redis, client)


def is_cluster(client: object) -> bool:
    """Whether ``client`` is a Redis Cluster client (asyncio or not)."""
    return isinstance(client, RedisCluster | redis.cluster.RedisCluster)


# Why a worker refuses a cluster with one shard.
ONE_SHARD_ON_CLUSTER = (
    "runs on Redis Cluster with sharded streams only: a batch's scripts take its series'"
    " keys at once (on Redis Streams with its streams'), which share a slot only under a"
    " shard's hash tag; set STREAM_SHARDS to a few times the number of masters, the same for"
    " the publishers (docs/operations.md#sharded-streams)"
)


def refuse_unsharded_cluster(settings: Settings, what: str = "the stream worker") -> None:
    """Raise NotOnClusterError when the settings name a Redis Cluster with one shard: the
    workers (``what``) run on one with STREAM_SHARDS above 1."""
    if settings.redis_cluster_nodes and settings.stream_shards <= 1:
        raise NotOnClusterError(f"{what} {ONE_SHARD_ON_CLUSTER}")


# What reading a cluster's layout raises while no node answers (left for a later attempt).
_LAYOUT_ERRORS = (redis.exceptions.RedisError, redis.exceptions.RedisClusterException, OSError)


async def prepare_clients(*clients: Redis) -> None:
    """Let cluster clients read the cluster's layout now, before concurrent use (nothing for
    one Redis; a cluster not reachable yet is left to the clients' first commands)."""
    for client in clients:
        if is_cluster(client):
            try:
                await cast(RedisCluster, client).initialize()
            except _LAYOUT_ERRORS:
                pass


_REREAD_SECONDS = 0.5
_last_reread: dict[int, float] = {}


async def reread_layout(*clients: Redis) -> None:
    """Make cluster clients read the cluster's layout again now (nothing for one Redis; the
    blocking clients' twin: ``reread_layout_sync``).

    After a lost master the client marks its layout stale and re-reads it before its next
    command; but a re-read during the failover (the dead master not yet failed over) learns
    the old layout again, and the node it asks where a command's keys are (``COMMAND
    GETKEYS``, for commands such as XREADGROUP) stays the one it started with: were that the
    dead master, every such command would fail until a restart. A retry loop calls this
    before each new attempt, so the promoted replica is found as soon as the cluster has
    promoted it. A failure here (no node answers yet) is left for the next attempt. At most
    one re-read a client every ``_REREAD_SECONDS``: each marks every connection of the
    client for a reconnect, so the shards' workers, retrying together, would churn them."""
    now = time.monotonic()
    for client in clients:
        if is_cluster(client):
            cluster = cast(RedisCluster, client)
            if now - _last_reread.get(id(cluster), -math.inf) < _REREAD_SECONDS:
                continue
            _last_reread[id(cluster)] = now
            try:
                await cluster.nodes_manager.initialize()
            except _LAYOUT_ERRORS:
                continue
            cluster.commands_parser.node = cluster.get_default_node()  # a live master


def reread_layout_sync(client: redis.Redis) -> None:
    """``reread_layout`` for a blocking client (the publisher, after a write refused for a
    moved slot or a lost master): read the cluster's layout again now (nothing on one Redis).
    Not rate-limited: a publisher re-reads once a refused batch, before sending it again. A
    failure here (no node answers yet) is left for the next attempt, as there."""
    if is_cluster(client):
        try:
            cast(redis.cluster.RedisCluster, client).nodes_manager.initialize()
        except _LAYOUT_ERRORS:
            pass


def reply_twin(settings: Settings, client: Redis) -> Redis:
    """A second client on ``client``'s server(s) whose reply parsing may be changed without
    changing ``client``'s: on one Redis a client over the same connection pool; on a
    cluster a cluster client of its own (its reply callbacks are shared by all its nodes)."""
    if is_cluster(client):
        return _cluster_client(settings)
    return Redis(connection_pool=client.connection_pool)


def sync_redis_client(settings: Settings, url: str | None = None) -> redis.Redis:
    """A blocking client, for command-line tools: ``url`` (else the settings' URL), or a
    cluster client when REDIS_CLUSTER_NODES is set (typed as one client: see
    ``_cluster_client``)."""
    if settings.redis_cluster_nodes and url is None:
        return cast(
            redis.Redis,
            redis.cluster.RedisCluster(
                startup_nodes=[
                    redis.cluster.ClusterNode(host, port)  # type: ignore[no-untyped-call]
                    for host, port in settings.redis_cluster_seeds()
                ],
                username=settings.redis_username,
                password=settings.redis_password,
                decode_responses=True,
            ),
        )
    return redis.Redis.from_url(url or settings.redis_connection_url(), decode_responses=True)


def postgres_pool(settings: Settings) -> AsyncConnectionPool:
    """An unopened pool; open it with ``await pool.open(wait=False)`` in a lifespan."""
    return AsyncConnectionPool(
        settings.postgres_conninfo(),
        min_size=settings.postgres_pool_min,
        max_size=settings.postgres_pool_max,
        kwargs={"autocommit": True, "connect_timeout": 3},
        timeout=5.0,  # how long a request waits for a connection before a 503
        # A pooled connection that a PostgreSQL restart has cut looks fine until it is used:
        # checking each one as it leaves the pool (an empty query, ~0.1 ms) swaps a dead one
        # for a fresh one instead of failing the request that got it.
        check=AsyncConnectionPool.check_connection,
        # While PostgreSQL is down the pool retries each lost connection with a doubling
        # delay (1, 2, 4 … s); by default it keeps doubling for 5 minutes, so after a long
        # outage the first reconnection could come minutes after PostgreSQL is back, and
        # every request meanwhile waited 5 s for a 503. Giving up after 10 s keeps the gaps
        # between attempts under the 5 s above; a waiting request then starts a fresh attempt.
        reconnect_timeout=10.0,
        open=False,
        name="anomaly-store",
    )


def schema_sql() -> str:
    return resources.files("detector.store").joinpath("schema.sql").read_text(encoding="utf-8")


async def apply_schema(pool: AsyncConnectionPool) -> None:
    """Create the tables if missing; safe to run from several processes at once."""
    async with pool.connection() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
        await conn.execute(schema_sql())
    log.info("database schema is in place")


def apply_schema_sync(conninfo: str) -> None:
    """The same, for command-line tools without an event loop."""
    with psycopg.connect(conninfo, autocommit=True) as conn, conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
        conn.execute(schema_sql())
