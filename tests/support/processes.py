"""Stream workers as users run them (``python -m detector``), stopped and waited for."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import redis

from detector.settings import Settings
from detector.shards import tagged
from detector.store.connections import sync_redis_client
from tests.support.polling import wait_for
from tests.support.services import ROOT, service_env


def start_worker(
    s: Settings, consumer: str, log_path: Path, *extra_args: str, **extra_env: str
) -> subprocess.Popen[bytes]:
    """``python -m detector`` pointed at ``s``'s servers and streams, its log (warnings and
    up) appended to ``log_path``."""
    env = service_env(
        s,
        STREAM_READINGS=s.stream_readings,
        STREAM_ANOMALIES=s.stream_anomalies,
        STREAM_DEAD=s.stream_dead,
        STREAM_SHARDS=str(s.stream_shards),
        STREAM_BATCH_COUNT=str(s.stream_batch_count),
        STREAM_BLOCK_MS="200",
        STREAM_CLAIM_IDLE_MS=str(s.stream_claim_idle_ms),
        STREAM_CLAIM_INTERVAL_MS=str(s.stream_claim_interval_ms),
        METRICS_PORT="0",
        **extra_env,
    )
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [
                *(sys.executable, "-m", "detector", "--consumer", consumer),
                *("--log-level", "warning", *extra_args),
            ],
            env=env,
            cwd=ROOT,
            stdout=log,
            stderr=log,
        )


def wait_consuming(
    s: Settings, consumer: str, proc: subprocess.Popen[bytes], timeout: float = 60
) -> None:
    """Wait until the worker ``consumer`` has joined its group (its first read): a test that
    times a fault against the stream starts publishing only then."""
    client = sync_redis_client(s)  # a cluster client when ``s`` names a cluster

    def joined() -> bool:
        assert proc.poll() is None, f"the worker exited with {proc.returncode}"
        try:
            # Every shard's worker joins at start-up; the last shard's joins last.
            consumers = client.xinfo_consumers(
                tagged(s.stream_readings, s.stream_shards - 1, s.stream_shards), s.stream_group
            )
        except redis.exceptions.ResponseError:  # no stream or group yet
            return False
        return any(c["name"] == consumer for c in consumers)

    try:
        wait_for(joined, f"worker {consumer} to join its group", timeout)
    finally:
        client.close()


def stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode
