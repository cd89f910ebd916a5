"""Opening the Redis client and the PostgreSQL pool, and applying the schema."""

from __future__ import annotations

import logging
from importlib import resources

import psycopg
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError, TimeoutError

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
    return Redis.from_url(
        settings.redis_connection_url(),
        decode_responses=True,
        socket_connect_timeout=2.0,
        socket_timeout=10.0,
        health_check_interval=30,
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), retries=2),
        retry_on_error=[ConnectionError, TimeoutError],
    )


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
