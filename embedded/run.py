"""`make run`: start Redis and PostgreSQL, apply the schema, then run and supervise the API and
the detector worker until Ctrl-C / SIGTERM, when everything it started is stopped cleanly."""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from detector.settings import Settings
from detector.store.connections import apply_schema_sync
from embedded.credentials import Credentials
from embedded.processes import child_setup, port_in_use
from embedded.servers import PostgresServer, RedisServer, blocking_folder

log = logging.getLogger("anomaly-run")

# The generated passwords, in the data folder (mode 0600), as a file a shell can source.
CREDENTIALS_FILE = "credentials.env"


def postgres_folder(data_dir: Path) -> Path:
    """Where `make run`'s PostgreSQL cluster lives: ``<data>/postgres``.

    Under root, PostgreSQL runs as ``nobody``, who must walk down to its folder; when a folder
    above the project is closed to other users (a home folder of mode 0700, say), no folder's
    mode is changed: the cluster gets a folder of its own instead, under ``/var/tmp`` (kept
    across reboots), named after the data folder so every `make run` finds it again.
    """
    default = data_dir / "postgres"
    if os.geteuid() != 0 or blocking_folder(default) is None:
        return default
    var_tmp = Path("/var/tmp")  # noqa: S108 (a predictable name, checked to be root's below)
    base = var_tmp if var_tmp.is_dir() else Path(tempfile.gettempdir())
    digest = hashlib.sha256(str(data_dir).encode()).hexdigest()[:16]
    own = base / f"anomaly-detector-{digest}"
    own.mkdir(mode=0o711, exist_ok=True)
    found = own.lstat()
    # In a world-writable folder someone else could have made the name first (or a link).
    if not stat.S_ISDIR(found.st_mode) or found.st_uid != 0:
        raise RuntimeError(
            f"{own} exists and is not a folder of root's: remove it, or run as a user"
        )
    own.chmod(0o711)  # ours alone: made here, walk-through only
    log.warning(
        "%s is not reachable by nobody (PostgreSQL's user under root): its cluster is in %s",
        data_dir,
        own / "postgres",
    )
    return own / "postgres"


@dataclass
class Child:
    """A supervised service process, restarted when it dies (with a growing back-off)."""

    name: str
    argv: list[str]
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    next_start: float = 0.0
    started_at: float = field(default=0.0)

    def start(self) -> None:
        # The child gets SIGTERM should this supervisor die without stopping it (no orphan
        # keeps a port or consumes the stream).
        self.proc = subprocess.Popen(
            self.argv, env=self.env, stdin=subprocess.DEVNULL, preexec_fn=child_setup()
        )
        self.started_at = time.monotonic()
        log.info("started %s (pid %d)", self.name, self.proc.pid)

    def check(self) -> None:
        if self.proc is None:
            if time.monotonic() >= self.next_start:
                self.start()
            return
        code = self.proc.poll()
        if code is None:
            if time.monotonic() - self.started_at > 60:
                self.restarts = 0  # it has been healthy for a while: reset the back-off
            return
        delay = min(30.0, 0.5 * 2**self.restarts)
        self.restarts += 1
        log.warning("%s exited with code %s; restarting in %.1f s", self.name, code, delay)
        self.proc = None
        self.next_start = time.monotonic() + delay

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within 30 s; killing it", self.name)
            self.proc.kill()
            self.proc.wait()


def main() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings = Settings()
    data_dir = Path(os.environ.get("DATA_DIR", ".data")).resolve()
    api_port = int(os.environ.get("PORT", "8000"))
    if port_in_use(api_port):
        sys.exit(f"port {api_port} is taken: stop what listens there or set PORT")

    stopping = False

    def request_stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    # The data folder is ours: 0711 lets PostgreSQL (as nobody, under root) walk through to
    # its own 0700 folder without listing or reading anything else here.
    data_dir.mkdir(parents=True, exist_ok=True)
    data_dir.chmod(0o711)
    credentials = Credentials.load_or_create(data_dir / CREDENTIALS_FILE)
    redis = RedisServer(data_dir / "redis", settings.redis_port, credentials=credentials)
    postgres = PostgresServer(
        postgres_folder(data_dir),
        settings.postgres_port,
        database=settings.postgres_db,
        user=settings.postgres_user,
        credentials=credentials,
    )
    served = settings.model_copy(update={**redis.settings_fields(), **postgres.settings_fields()})
    children: list[Child] = []
    try:
        redis.start()
        postgres.start()
        apply_schema_sync(served.postgres_conninfo())
        env = {
            **os.environ,
            **{name.upper(): str(value) for name, value in redis.settings_fields().items()},
            **{name.upper(): str(value) for name, value in postgres.settings_fields().items()},
        }
        # A URL or DSN in the environment would take precedence over the parts set here.
        env.pop("REDIS_URL", None)
        env.pop("POSTGRES_DSN", None)
        env.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{data_dir / 'mlflow.db'}")
        env.setdefault("MLFLOW_ARTIFACTS_DESTINATION", str(data_dir / "mlartifacts"))
        children.append(Child("api", [sys.executable, "-m", "api", "--port", str(api_port)], env))
        children.append(
            Child("detector", [sys.executable, "-m", "detector"], _worker_env(env, settings))
        )
        log.info(
            "data in %s; API on http://127.0.0.1:%d (docs at /docs); Ctrl-C stops; "
            "clients: `set -a; . %s; set +a`",
            data_dir,
            api_port,
            data_dir / CREDENTIALS_FILE,
        )
        while not stopping:
            for child in children:
                if stopping:  # a stop signal during the round: restart nothing more
                    break
                child.check()
            time.sleep(0.2)
        log.info("stopping")
    finally:
        for child in reversed(children):
            child.stop()
        postgres.stop()
        redis.stop()
        log.info("stopped")


def _worker_env(env: dict[str, str], settings: Settings) -> dict[str, str]:
    """The worker's environment: its /metrics on METRICS_PORT (9101), or off if that is taken
    by something else (a metrics port must not stop the detector from running)."""
    port = settings.metrics_port
    if port and port_in_use(port):
        log.warning("port %d is taken: the detector's /metrics is off (set METRICS_PORT)", port)
        port = 0
    return {**env, "METRICS_PORT": str(port)}


if __name__ == "__main__":
    main()
