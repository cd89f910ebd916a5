"""The embedded servers of `make run` and of the test session are closed to other local users:
Redis and PostgreSQL need the generated passwords, the service's Redis user cannot run
administrative commands, the credentials file is private, and no folder outside the data
folder changes mode."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
import redis

from detector.settings import Settings
from embedded.processes import free_port
from embedded.run import postgres_folder
from embedded.servers import PostgresServer, RedisServer, blocking_folder
from tests.support.services import ROOT, wait_serving


def assert_redis_closed(port: int, settings: Settings) -> None:
    """No password: NOAUTH; the service user: no CONFIG (no file writes as Redis' user)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        raw.sendall(b"CONFIG SET dir /tmp\r\n")
        assert raw.recv(200).startswith(b"-NOAUTH")
    service = redis.Redis.from_url(settings.redis_connection_url())
    try:
        assert service.ping()
        for command in (
            ("CONFIG", "SET", "dir", tempfile.gettempdir()),
            ("DEBUG", "SLEEP", "0"),
            ("FLUSHALL",),
            ("SHUTDOWN", "NOSAVE"),
        ):
            with pytest.raises(redis.exceptions.NoPermissionError):
                service.execute_command(*command)
    finally:
        service.close()


def assert_postgres_closed(port: int, settings: Settings) -> None:
    for conninfo in (
        f"postgresql://{settings.postgres_user}@127.0.0.1:{port}/postgres",
        f"postgresql://{settings.postgres_user}:wrong@127.0.0.1:{port}/postgres",
    ):
        with pytest.raises(psycopg.OperationalError, match="password"):
            psycopg.connect(conninfo, connect_timeout=5).close()
    with psycopg.connect(settings.postgres_conninfo(), connect_timeout=5) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_session_servers_need_their_passwords(
    settings: Settings, redis_server: RedisServer, postgres_server: PostgresServer
) -> None:
    assert_redis_closed(redis_server.port, settings)
    assert_postgres_closed(postgres_server.port, settings)


def test_a_trusting_cluster_is_switched_to_passwords() -> None:
    # A data folder from before passwords: every loopback connection trusted.
    top = Path(tempfile.mkdtemp(prefix="anomaly-test-pg-"))
    top.chmod(0o711)
    server = PostgresServer(top / "data", free_port(), durable=False)
    try:
        server.start().stop()
        hba = server.data_dir / "pg_hba.conf"
        hba.write_text("host all all 127.0.0.1/32 trust\n")
        server.start()
        settings = Settings(**server.settings_fields())
        assert_postgres_closed(server.port, settings)
        assert "trust" not in hba.read_text()
    finally:
        server.stop()
        subprocess.run(["rm", "-rf", str(top)], check=False)


def test_session_admin_client_keeps_the_dangerous_commands(redis_client: redis.Redis) -> None:
    # The fault tests need DEBUG SLEEP and FLUSHALL: the session's admin path keeps them.
    assert redis_client.execute_command("DEBUG", "SLEEP", "0")
    assert redis_client.config_get("dir")


def ancestor_modes(path: Path) -> dict[Path, int]:
    return {parent: parent.stat().st_mode for parent in path.resolve().parents}


@pytest.fixture
def make_run() -> Iterator[tuple[Path, int, int, str, dict[Path, int]]]:
    """`python -m embedded.run` on free ports, its data in a fresh folder."""
    top = Path(tempfile.mkdtemp(prefix="anomaly-make-run-"))
    # Under root PostgreSQL runs as nobody, who must be able to walk down to the data folder:
    # this test's own folder is made traversable here, before the modes are recorded.
    top.chmod(0o755)
    data_dir = top / "data"
    before = ancestor_modes(data_dir)
    redis_port, postgres_port, api_port = free_port(), free_port(), free_port()
    env = {
        **os.environ,
        "DATA_DIR": str(data_dir),
        "REDIS_PORT": str(redis_port),
        "POSTGRES_PORT": str(postgres_port),
        "PORT": str(api_port),
        "METRICS_PORT": "0",
    }
    for name in ("REDIS_PASSWORD", "REDIS_USERNAME", "POSTGRES_PASSWORD", "API_KEYS"):
        env.pop(name, None)
    proc = subprocess.Popen([sys.executable, "-m", "embedded.run"], env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{api_port}"
    try:
        wait_serving(url, proc, timeout=120)
        yield data_dir, redis_port, postgres_port, url, before
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)
        subprocess.run(["rm", "-rf", str(top)], check=False)


def test_make_run_servers_are_closed_and_nothing_outside_changes_mode(
    make_run: tuple[Path, int, int, str, dict[Path, int]],
) -> None:
    data_dir, redis_port, postgres_port, url, before = make_run
    credentials = data_dir / "credentials.env"
    assert stat.S_IMODE(credentials.stat().st_mode) == 0o600
    values = dict(
        line.split("=", 1) for line in credentials.read_text().splitlines() if "=" in line
    )
    settings = Settings(
        redis_port=redis_port,
        redis_username=values["REDIS_USERNAME"],
        redis_password=values["REDIS_PASSWORD"],
        postgres_port=postgres_port,
        postgres_password=values["POSTGRES_PASSWORD"],
    )
    assert_redis_closed(redis_port, settings)
    assert_postgres_closed(postgres_port, settings)
    for config in data_dir.rglob("redis.conf"):
        assert stat.S_IMODE(config.stat().st_mode) == 0o600
    # The API and the worker it started work with those credentials.
    fit = httpx.post(
        f"{url}/fit/make-run", json={"timestamps": [1, 2, 3], "values": [1.0, 2.0, 4.0]}
    )
    assert fit.status_code == 200, fit.text
    assert ancestor_modes(data_dir) == before


@pytest.mark.skipif(os.geteuid() != 0, reason="PostgreSQL runs as nobody under root only")
def test_a_project_below_a_closed_folder_gets_its_cluster_elsewhere_without_mode_changes():
    closed = Path(tempfile.mkdtemp(prefix="anomaly-closed-"))  # 0700, as a home folder
    data_dir = closed / "project" / ".data"
    data_dir.mkdir(parents=True)
    before = ancestor_modes(data_dir)
    folder = postgres_folder(data_dir)
    try:
        assert blocking_folder(data_dir / "postgres") == closed
        assert folder.name == "postgres" and folder.parent.parent in (
            Path("/var/tmp"),
            Path(tempfile.gettempdir()),
        )
        assert blocking_folder(folder) is None  # nobody can walk down to it
        own = folder.parent.stat()
        assert own.st_uid == 0 and stat.S_IMODE(own.st_mode) == 0o711
        assert postgres_folder(data_dir) == folder  # the next `make run` finds it again
        assert ancestor_modes(data_dir) == before  # no folder above the project changed
    finally:
        subprocess.run(["rm", "-rf", str(folder.parent), str(closed)], check=False)
