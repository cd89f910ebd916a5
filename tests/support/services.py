"""Starting the real service for tests: its environment and the API in its own process."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from detector.settings import Settings
from embedded.processes import free_port

ROOT = Path(__file__).resolve().parents[2]


def postgres_data_dir() -> Path:
    """A fresh folder for a test PostgreSQL cluster, outside pytest's own temporary root.

    Under root, PostgreSQL runs as ``nobody`` and must be able to walk down to its data; pytest's
    temporary root is mode 0700. The folder made here is this session's own, so it (and only
    it) is opened to traversal (0711: no listing); the cluster below it stays 0700.
    """
    top = Path(tempfile.mkdtemp(prefix="anomaly-test-pg-"))
    top.chmod(0o711)
    return top / "data"


def service_env(settings: Settings, **extra: str) -> dict[str, str]:
    """Environment for a service subprocess pointed at the test servers.

    The suites written against the μ ± kσ rule in the stream fit without a ``kind`` and expect
    ``static``: they pin ``DEFAULT_KIND=static``. ``DEFAULT_KIND=""`` in ``extra`` leaves the
    service its own default (``tests/integration/test_default_kind.py``). Likewise the suites
    that count every entry of the output were written before incidents: they pin
    ``INCIDENT_MIN_SERIES=0``, and the incident tests set it (``tests/integration/
    test_incidents.py``)."""
    env = {
        **os.environ,
        "DEFAULT_KIND": "static",
        "INCIDENT_MIN_SERIES": "0",
        "REDIS_HOST": settings.redis_host,
        "REDIS_PORT": str(settings.redis_port),
        "REDIS_USERNAME": settings.redis_username or "",
        "REDIS_PASSWORD": settings.redis_password or "",
        "REDIS_CLUSTER_NODES": settings.redis_cluster_nodes,
        "POSTGRES_HOST": settings.postgres_host,
        "POSTGRES_PORT": str(settings.postgres_port),
        "POSTGRES_DB": settings.postgres_db,
        "POSTGRES_USER": settings.postgres_user,
        "POSTGRES_PASSWORD": settings.postgres_password,
        **extra,
    }
    if not env["DEFAULT_KIND"]:
        del env["DEFAULT_KIND"]
    return env


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
