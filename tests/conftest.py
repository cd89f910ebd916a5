"""Session fixtures: real Redis and PostgreSQL processes, and the real API served by uvicorn."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import hypothesis
import psycopg
import pytest
import redis

from detector.connections import apply_schema_sync
from detector.settings import Settings
from embedded.servers import PostgresServer, RedisServer, free_port

ROOT = Path(__file__).resolve().parent.parent

# No per-example deadline and no "generation is slow" check: these machines are shared and
# noisy, and a slow example is not a wrong one (speed is judged by `make bench`, never here).
hypothesis.settings.register_profile(
    "project", deadline=None, suppress_health_check=[hypothesis.HealthCheck.too_slow]
)
hypothesis.settings.load_profile("project")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"), free_port(), appendonly=True)
    server.start()
    yield server
    server.stop()


def postgres_data_dir() -> Path:
    """A fresh folder for a test PostgreSQL cluster, outside pytest's own temporary root.

    Under root, PostgreSQL runs as ``nobody`` and must be able to walk down to its data; pytest's
    temporary root is mode 0700. The folder made here is this session's own, so it (and only
    it) is opened to traversal (0711: no listing); the cluster below it stays 0700.
    """
    top = Path(tempfile.mkdtemp(prefix="anomaly-test-pg-"))
    top.chmod(0o711)
    return top / "data"


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
    user (no administrative commands; tests that need them use ``redis_client``)."""
    return Settings(**redis_server.settings_fields(), **postgres_server.settings_fields())


def service_env(settings: Settings, **extra: str) -> dict[str, str]:
    """Environment for a service subprocess pointed at the test servers."""
    return {
        **os.environ,
        "REDIS_HOST": settings.redis_host,
        "REDIS_PORT": str(settings.redis_port),
        "REDIS_USERNAME": settings.redis_username or "",
        "REDIS_PASSWORD": settings.redis_password or "",
        "POSTGRES_HOST": settings.postgres_host,
        "POSTGRES_PORT": str(settings.postgres_port),
        "POSTGRES_DB": settings.postgres_db,
        "POSTGRES_USER": settings.postgres_user,
        "POSTGRES_PASSWORD": settings.postgres_password,
        **extra,
    }


def wait_serving(
    base_url: str, proc: subprocess.Popen[bytes], *, healthy: bool = True, timeout: float = 60
) -> None:
    """Wait until the API answers /healthcheck (with 200, unless ``healthy`` is False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the API exited with code {proc.returncode}")
        try:
            status = httpx.get(f"{base_url}/healthcheck", timeout=10).status_code
            if status == 200 or not healthy:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError("the API did not become healthy")


def start_api(
    settings: Settings, *, healthy: bool = True, **extra_env: str
) -> tuple[subprocess.Popen[bytes], str]:
    """The API in its own process, pointed at the test servers (``extra_env`` overrides)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "api", "--port", str(port), "--log-level", "warning"],
        env=service_env(settings, **extra_env),
        cwd=ROOT,
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_serving(base_url, proc, healthy=healthy)
    except BaseException:
        proc.kill()  # never leave a server behind when it fails to come up
        proc.wait(30)
        raise
    return proc, base_url


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
