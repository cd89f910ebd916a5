"""Fixtures of the integration tests that inject faults: Redis and PostgreSQL servers of the
module's own, so the session's servers (used by every other test) never notice a fault."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest
import redis

from detector.settings import Settings
from detector.store.connections import apply_schema_sync
from embedded.processes import free_port
from embedded.servers import PostgresServer, RedisServer
from tests.support.services import postgres_data_dir
from tests.support.streams import stream_settings

# ---------------------------------------------------------------- servers of our own


@pytest.fixture(scope="module")
def fault_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("fault-redis"), free_port(), appendonly=True)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def fault_postgres() -> Iterator[PostgresServer]:
    # Durable settings (fsync, synchronous commit): these tests stop the server under load
    # and check what survived, which a throwaway cluster's asynchronous commits could lose.
    data_dir = postgres_data_dir()
    server = PostgresServer(data_dir, free_port(), durable=True)
    server.start()
    apply_schema_sync(server.conninfo())
    yield server
    server.stop()
    shutil.rmtree(data_dir.parent, ignore_errors=True)


@pytest.fixture
def fault_settings(fault_redis: RedisServer, fault_postgres: PostgresServer) -> Settings:
    """This module's servers, and streams of this test's own."""
    base = Settings(**fault_redis.settings_fields(), **fault_postgres.settings_fields())
    return stream_settings(base, stream_batch_count=100)


@pytest.fixture
def rclient(fault_redis: RedisServer) -> Iterator[redis.Redis]:
    # The admin user: these tests FLUSHALL and DEBUG SLEEP, which the services may not.
    client = redis.Redis.from_url(fault_redis.admin_url(), decode_responses=True, socket_timeout=10)
    yield client
    client.close()
