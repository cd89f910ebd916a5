"""Starting what a benchmark drives: the embedded Redis and PostgreSQL, the API, child processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from detector.settings import Settings
from detector.store.connections import apply_schema_sync
from embedded.processes import free_port
from embedded.servers import PostgresServer, RedisServer

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Api:
    """An API process serving on ``url``."""

    url: str
    port: int
    pid: int


def env_for(settings: Settings) -> dict[str, str]:
    """Environment for a service process pointed at ``settings``' servers (their service
    credentials included), MLflow unset."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW")}
    env.update(
        REDIS_HOST="127.0.0.1",
        REDIS_PORT=str(settings.redis_port),
        REDIS_USERNAME=settings.redis_username or "",
        REDIS_PASSWORD=settings.redis_password or "",
        POSTGRES_HOST="127.0.0.1",
        POSTGRES_PORT=str(settings.postgres_port),
        POSTGRES_USER=settings.postgres_user,
        POSTGRES_PASSWORD=settings.postgres_password,
    )
    return env


@dataclass(frozen=True)
class Servers:
    """The benchmark's servers: the services' settings, and Redis' admin URL (for INFO)."""

    settings: Settings
    redis_admin_url: str


@contextmanager
def embedded_servers(
    data_dir: Path, *, durable: bool = True, **settings_fields: Any
) -> Iterator[Servers]:
    """Redis and PostgreSQL (with the schema) in ``data_dir`` (a folder of the benchmark's own,
    opened to traversal only: under root, PostgreSQL runs as nobody), with generated passwords."""
    data_dir.chmod(0o711)
    redis_server = RedisServer(data_dir / "redis", free_port()).start()
    try:
        pg_server = PostgresServer(data_dir / "pg", free_port(), durable=durable).start()
        try:
            settings = Settings(
                **redis_server.settings_fields(), **pg_server.settings_fields(), **settings_fields
            )
            apply_schema_sync(settings.postgres_conninfo())
            yield Servers(settings, redis_server.admin_url())
        finally:
            pg_server.stop()
    finally:
        redis_server.stop()


def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    """Wait until the API at ``url`` answers its healthcheck with 200; fail if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the API exited with code {proc.returncode}")
        try:
            if httpx.get(f"{url}/healthcheck").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("the API did not start")
        time.sleep(0.1)


@contextmanager
def api_process(settings: Settings, command: list[str], **env: str) -> Iterator[Api]:
    """``python <command> --port N`` (an API) pointed at ``settings``, healthy; stopped after."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, *command, "--port", str(port)],
        env=env_for(settings) | env,
        cwd=ROOT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
        yield Api(url, port, proc.pid)
    finally:
        proc.terminate()
        proc.wait(60)


# py-spy processes attached to children (``spawn(profile=True)``), by the child's pid.
_PROFILERS: dict[int, subprocess.Popen[bytes]] = {}


def spawn(
    args: list[str], env: dict[str, str], log_path: Path, *, profile: bool = False
) -> subprocess.Popen[bytes]:
    """Start ``python <args>``; with ``profile`` and BENCH_PROFILE=<dir>, with ``py-spy
    record`` attached to it (by pid, so signals reach the child itself): raw collapsed stacks
    written to that folder when it exits, idle frames included."""
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, *args], env=env, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT
        )
    profile_dir = os.environ.get("BENCH_PROFILE")
    if profile and profile_dir:
        out = Path(profile_dir) / f"{log_path.stem}.txt"
        beside = Path(sys.executable).with_name("py-spy")  # the venv's, if it has one
        spy = str(beside) if beside.exists() else "py-spy"
        command = [spy, "record", "--idle", "-r", "250", "-f", "raw", "-o", str(out)]
        _PROFILERS[proc.pid] = subprocess.Popen(
            [*command, "--pid", str(proc.pid)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    return proc


def reap(proc: subprocess.Popen[bytes]) -> float:
    """Wait for a child and return the CPU seconds it used (user + system)."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    profiler = _PROFILERS.pop(proc.pid, None)
    if profiler is not None:
        profiler.wait(60)  # it writes its output once the child is gone
    if proc.returncode != 0:
        raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
    return usage.ru_utime + usage.ru_stime
