"""The two stream transports behind one test interface, so contract tests run on both, on
one Redis and on a Redis Cluster (sharded streams).

Each adapter publishes readings, runs the worker as users run it (its own process), waits
until every reading is committed, and reads the events and dead letters back as text fields.
"""

from __future__ import annotations

import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Protocol

import redis

from detector.settings import Settings
from detector.shards import shards
from detector.store.connections import sync_redis_client
from ingest.kafka import KafkaPublisher
from ingest.publisher import Publisher
from tests.support.kafka import KafkaNames, KafkaWorker, create_topics, group_caught_up, read_topic
from tests.support.processes import start_worker, stop_process
from tests.support.streams import publish, shard_events, shards_drained, stream_settings

Row = tuple[str, int, float]


class Transport(Protocol):
    name: str
    on_cluster: bool  # its Redis is the cluster (the API to fit through is the cluster's)
    # Whether a redelivered reading's event is never written twice (Redis Streams' commit
    # script) or may be, with the same source id (Kafka: at least once).
    exactly_once: bool

    def publish(self, rows: list[Row]) -> None: ...

    def publish_fields(self, fields: dict[str, str]) -> None: ...

    def start_worker(self) -> None: ...

    def kill_worker(self) -> None: ...

    def stop_worker(self) -> None: ...

    def drained(self) -> bool: ...

    def events(self) -> list[dict[str, str]]: ...

    def dead(self) -> list[dict[str, str]]: ...

    def incident_source(self) -> str: ...


def _text(value: Any) -> str:
    """A Kafka value's field as the Redis transport writes it (floats round-trip exactly)."""
    if isinstance(value, str):
        return value
    return repr(value) if isinstance(value, float) else str(value)


class RedisTransport:
    """`readings` → `python -m detector` → `anomalies`, `readings:dead`."""

    name = "redis"
    exactly_once = True
    on_cluster = False
    SHARDS = 1

    def __init__(self, settings: Settings, **env: str) -> None:
        self.settings = stream_settings(
            settings,
            stream_shards=self.SHARDS,
            stream_batch_count=500,
            stream_claim_idle_ms=1000,
        )
        self.client = self._connect()
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = Path(tempfile.mkstemp(prefix="worker-", suffix=".log")[1])

    def _connect(self) -> redis.Redis:
        return redis.Redis.from_url(self.settings.redis_connection_url(), decode_responses=True)

    def publish(self, rows: list[Row]) -> None:
        publish(self.client, self.settings.stream_readings, rows)

    def publish_fields(self, fields: dict[str, str]) -> None:
        self.client.xadd(self.settings.stream_readings, fields)  # type: ignore[arg-type]

    def start_worker(self) -> None:
        self.proc = start_worker(self.settings, "contract", self.log, **self.env)

    def kill_worker(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop_worker(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
        self.client.close()

    def drained(self) -> bool:
        s = self.settings
        try:
            groups = self.client.xinfo_groups(s.stream_readings)
        except redis.ResponseError:
            return False
        group = next((g for g in groups if g["name"] == s.stream_group), None)
        if group is None or group["pending"]:
            return False
        last = self.client.xrevrange(s.stream_readings, count=1)
        return not last or group["last-delivered-id"] == last[0][0]

    def events(self) -> list[dict[str, str]]:
        return [f for _, f in self.client.xrange(self.settings.stream_anomalies)]

    def dead(self) -> list[dict[str, str]]:
        return [f for _, f in self.client.xrange(self.settings.stream_dead)]

    def incident_source(self) -> str:
        """What the anomaly history records incidents under."""
        return self.settings.stream_anomalies


class ClusterTransport(RedisTransport):
    """The same on a Redis Cluster with sharded streams: the publisher routes each series to
    its shard, the worker serves every shard, events and letters are read from them all."""

    name = "cluster"
    on_cluster = True
    SHARDS = 6

    def _connect(self) -> redis.Redis:
        return sync_redis_client(self.settings)

    def _publisher(self) -> Publisher:
        return Publisher(self.client, stream=self.settings.stream_readings, shards=self.SHARDS)

    def publish(self, rows: list[Row]) -> None:
        with self._publisher() as publisher:
            for series_id, timestamp, value in rows:
                publisher.publish(series_id, timestamp, value)

    def publish_fields(self, fields: dict[str, str]) -> None:
        with self._publisher() as publisher:
            publisher.publish_fields(fields)

    def drained(self) -> bool:
        return shards_drained(self.client, self.settings)

    def events(self) -> list[dict[str, str]]:
        return [f for events in shard_events(self.client, self.settings).values() for f in events]

    def dead(self) -> list[dict[str, str]]:
        return [f for s in shards(self.settings) for _, f in self.client.xrange(s.dead)]

    def incident_source(self) -> str:
        return shards(self.settings)[0].anomalies  # incidents live in the first shard's slot


class KafkaTransport:
    """Topic `readings` → the faust agent → topics `anomalies`, `readings.dead`."""

    name = "kafka"
    exactly_once = False
    on_cluster = False

    def __init__(self, settings: Settings, bootstrap: str, **env: str) -> None:
        self.settings, self.bootstrap, self.env = settings, bootstrap, env
        self.names = KafkaNames.fresh()
        create_topics(bootstrap, self.names)
        self.worker: KafkaWorker | None = None

    def publish(self, rows: list[Row]) -> None:
        with KafkaPublisher(f"kafka://{self.bootstrap}", topic=self.names.readings) as publisher:
            for series_id, timestamp, value in rows:
                publisher.publish(series_id, timestamp, value)

    def publish_fields(self, fields: dict[str, str]) -> None:
        with KafkaPublisher(f"kafka://{self.bootstrap}", topic=self.names.readings) as publisher:
            publisher.publish_fields(fields)

    def start_worker(self) -> None:
        self.worker = KafkaWorker(self.settings, self.bootstrap, self.names, **self.env)

    def kill_worker(self) -> None:
        assert self.worker is not None
        self.worker.kill()

    def stop_worker(self) -> None:
        if self.worker is not None:
            self.worker.stop()

    def drained(self) -> bool:
        return group_caught_up(self.bootstrap, self.names.app_id, self.names.readings)

    def events(self) -> list[dict[str, str]]:
        return [
            {k: _text(v) for k, v in value.items()}
            for _, _, _, value in read_topic(self.bootstrap, self.names.anomalies)
        ]

    def dead(self) -> list[dict[str, str]]:
        return [
            {k: _text(v) for k, v in value.items()}
            for _, _, _, value in read_topic(self.bootstrap, self.names.dead)
        ]

    def incident_source(self) -> str:
        return f"kafka:{self.names.anomalies}"


class KafkaClusterTransport(KafkaTransport):
    """The faust worker with its Redis keys on a Redis Cluster (``kafka_shards``)."""

    name = "kafka-cluster"
    on_cluster = True

    def __init__(self, settings: Settings, bootstrap: str, **env: str) -> None:
        super().__init__(settings, bootstrap, STREAM_SHARDS=str(ClusterTransport.SHARDS), **env)
