"""Session fixtures: real Redis and PostgreSQL processes, and the real API served by uvicorn."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator

import httpx
import hypothesis
import psycopg
import pytest
import redis

from detector.settings import Settings
from detector.store.connections import apply_schema_sync, sync_redis_client
from embedded.processes import free_cluster_ports, free_port
from embedded.servers import PostgresServer, RedisClusterServers, RedisServer
from tests.support.services import postgres_data_dir, start_api

# No per-example deadline and no "generation is slow" check: these machines are shared and
# noisy, and a slow example is not a wrong one (speed is judged by `make bench`, never here).
# Under CI the examples are derandomized (the same every run), so a build's verdict does not
# depend on luck; locally every run explores new ones.
hypothesis.settings.register_profile(
    "project",
    deadline=None,
    suppress_health_check=[hypothesis.HealthCheck.too_slow],
    derandomize=bool(os.environ.get("CI")),
)
hypothesis.settings.load_profile("project")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"), free_port(), appendonly=True)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServers]:
    """A Redis Cluster of three masters and three replicas, the same redis-server as
    ``redis_server``'s; started by the first test that asks for it (a few seconds)."""
    cluster = RedisClusterServers(tmp_path_factory.mktemp("redis-cluster"), free_cluster_ports(6))
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def cluster_settings(redis_cluster: RedisClusterServers, settings: Settings) -> Settings:
    """The session's settings pointed at the Redis Cluster instead (PostgreSQL the same)."""
    return settings.model_copy(update=redis_cluster.settings_fields())


@pytest.fixture(scope="session")
def cluster_api_url(cluster_settings: Settings) -> Iterator[str]:
    """The real service on the Redis Cluster, in its own process."""
    proc, base_url = start_api(cluster_settings)
    yield base_url
    proc.terminate()
    proc.wait(30)


@pytest.fixture
def cluster_client(cluster_api_url: str) -> Iterator[httpx.Client]:
    """An HTTP client of the service on the Redis Cluster."""
    with httpx.Client(base_url=cluster_api_url, timeout=60) as http:
        yield http


@pytest.fixture
def rc(cluster_settings: Settings) -> Iterator[redis.Redis]:
    """A cluster client as the service user, as the ingest CLI makes it."""
    client = sync_redis_client(cluster_settings)
    yield client
    client.close()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    data_dir = postgres_data_dir()
    server = PostgresServer(data_dir, free_port(), durable=False)
    server.start()
    apply_schema_sync(server.conninfo())
    yield server
    server.stop()
    shutil.rmtree(data_dir.parent, ignore_errors=True)


@pytest.fixture(scope="session")
def settings(redis_server: RedisServer, postgres_server: PostgresServer) -> Settings:
    """The services' view of the session's servers: the generated passwords, and Redis' service
    user (no administrative commands; tests that need them use ``redis_client``). Incidents
    are off, as for the worker processes (``tests.support.services.service_env``); the
    incident tests turn them on."""
    return Settings(
        **redis_server.settings_fields(),
        **postgres_server.settings_fields(),
        incident_min_series=0,
    )


@pytest.fixture(scope="session")
def api_url(settings: Settings) -> Iterator[str]:
    """The real service, in its own process, as a user runs it."""
    proc, base_url = start_api(settings)
    yield base_url
    proc.terminate()
    proc.wait(30)


@pytest.fixture
def client(api_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api_url, timeout=60) as http:
        yield http


@pytest.fixture
def series_id() -> str:
    """A fresh series per test: tests never share state, so no flushing is needed."""
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """The session's admin path to Redis: every command (FLUSHALL, CLIENT KILL, DEBUG …)."""
    client = redis.Redis.from_url(redis_server.admin_url(), decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def pg(settings: Settings) -> Iterator[psycopg.Connection]:
    with psycopg.connect(settings.postgres_conninfo(), autocommit=True) as conn:
        yield conn


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """A Kafka-protocol broker (tansu, in-memory storage) for the session: ``host:port``."""
    from tests.support.kafka import start_tansu

    port = free_port()
    proc = start_tansu(port)
    yield f"127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)
