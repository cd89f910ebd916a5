"""Service settings, read from environment variables (names listed in docs/operations.md)."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal
from urllib.parse import quote

from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from detector.kinds.registry import ModelKind
from detector.kinds.static import MAX_SIGMA

Direction = Literal["above", "below", "both"]


def api_key_list(csv: str) -> list[str]:
    """The keys in a comma-separated API_KEYS / API_READ_KEYS value."""
    return [key.strip() for key in csv.split(",") if key.strip()]


class Settings(BaseSettings):
    """Every knob of the service.

    The fields are flat rather than nested groups because the environment names
    (``REDIS_HOST``, ``POSTGRES_PORT`` …) are a documented interface that operators already
    set; the groups show in the names' prefixes instead.
    """

    # `make run` keeps its generated passwords in <DATA_DIR>/credentials.env: every command run
    # in the project folder (the ingest CLI, the API, a worker) finds them there; environment
    # variables win over the file, and without the file nothing changes.
    model_config = SettingsConfigDict(
        env_file=Path(os.environ.get("DATA_DIR", ".data")) / "credentials.env",
        extra="ignore",
        frozen=True,
    )

    # Redis: the hot model store and the streams.
    redis_host: str = "127.0.0.1"
    redis_port: int = 6379
    redis_db: int = 0
    # An ACL user (Redis 6+); none logs in as `default`. `make run` generates both.
    redis_username: str | None = None
    redis_password: str | None = None
    redis_url: str | None = Field(default=None, description="Overrides the REDIS_* parts.")
    # Redis Cluster: seed nodes `host:port,host:port` (any few of the cluster's nodes; the
    # client learns the rest). Set, every client is a cluster client logging in as
    # REDIS_USERNAME / REDIS_PASSWORD on each node, and REDIS_HOST, REDIS_PORT, REDIS_DB and
    # REDIS_URL are not used. What runs on a cluster: docs/operations.md#redis-cluster.
    redis_cluster_nodes: str = ""
    # Replicas that must acknowledge a publisher's batch and a fit's version (Redis' WAIT)
    # before it is reported done; 0 (the default): the master's answer, with asynchronous
    # replication, so a failover can lose what it acknowledged last (docs/operations.md).
    # Too few within the timeout fails the publish or the fit loudly. The timeout stays below
    # the clients' 10 s socket timeout.
    redis_wait_replicas: int = Field(default=0, ge=0)
    redis_wait_timeout_ms: int = Field(default=1000, ge=1, le=5000)

    # PostgreSQL: the durable store, source of truth.
    postgres_host: str = "127.0.0.1"
    postgres_port: int = 5432
    postgres_db: str = "anomaly"
    postgres_user: str = "postgres"
    postgres_password: str = ""
    postgres_dsn: str | None = Field(default=None, description="Overrides the POSTGRES_* parts.")
    postgres_pool_min: int = 1
    postgres_pool_max: int = 10

    # MLflow tracking.
    mlflow_tracking_uri: str | None = None
    mlflow_experiment: str = "anomaly-detection"

    # The model.
    default_sigma: float = Field(default=3.0, gt=0, le=MAX_SIGMA)
    default_direction: Direction = "above"
    # The kind a fit without a `kind` option makes: what the stream judges its readings by.
    # seasonal generalises best of the kinds measured (docs/detection-quality.md); REST predict
    # and the batch endpoint apply every version's μ ± kσ rule, whatever its kind.
    default_kind: ModelKind = "seasonal"
    min_training_points: int = Field(default=3, ge=2)
    max_training_points: int = Field(default=5_000_000, ge=3)
    max_body_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    max_batch_points: int = Field(default=1_000_000, ge=1)
    # Points a bulk fit request (POST /fit) takes in all, over all its series.
    max_bulk_fit_points: int = Field(default=1_000_000, ge=1)
    # Bytes of large request bodies (fits, batches) the API serves at once; parsing and
    # serving costs a few times this. Beyond it a request waits, then gets a 503.
    body_budget_bytes: int = Field(default=128 * 1024 * 1024, ge=1024)
    body_budget_wait_seconds: float = Field(default=30.0, ge=0)
    model_cache_size: int = Field(default=200_000, ge=0)
    # Cache latest pointers in the API process, invalidated by Redis key tracking
    # (docs/architecture.md).
    latest_pointer_tracking: bool = True

    # The API process.
    latency_window: int = Field(default=1000, ge=1)
    plot_max_points: int = Field(default=4000, ge=100)
    # Versions whose plotted points (at most ~150 KB each) the API keeps; 0 keeps none.
    plot_cache_size: int = Field(default=256, ge=0)
    # GET /events: clients one API process serves (beyond it a 503), and the events queued
    # for one client before it counts as too slow and is closed.
    sse_max_clients: int = Field(default=100, ge=1)
    sse_queue_events: int = Field(default=1000, ge=1)

    # Access control: off when no key is set. API_KEYS may fit and read; API_READ_KEYS may
    # only read (predict, models, plot, anomalies, events). Comma-separated.
    api_keys: str = ""
    api_read_keys: str = ""

    @field_validator("api_keys", "api_read_keys")
    @classmethod
    def _keys_or_nothing(cls, value: str, info: ValidationInfo) -> str:
        # A value of blanks and commas was meant to set keys: serving an open API instead would
        # hide the mistake, so it is refused (empty means no keys, on purpose).
        if value and not api_key_list(value):
            raise ValueError(
                f"{(info.field_name or '').upper()} has no key in it (only blanks and commas): "
                "set comma-separated keys, or leave it empty for no keys"
            )
        return value

    # The streams (docs/stream-contract.md). The worker writes events and acknowledges
    # readings in one script, so on a Redis Cluster the three share one slot: with
    # STREAM_SHARDS above 1 each shard's streams carry the shard's hash tag (``readings:
    # {s3.<j>}``, ``anomalies:{s3.<j>}``, ``readings:dead:{s3.<j>}``, ``detector.shards``);
    # with 1 shard the names are used as they are (docs/operations.md#sharded-streams).
    stream_shards: int = Field(default=1, ge=1, le=1024)
    stream_readings: str = "readings"
    stream_anomalies: str = "anomalies"
    stream_dead: str = "readings:dead"
    stream_group: str = "detector"
    stream_consumer: str | None = Field(
        default=None, description="This worker's consumer name; default host-pid."
    )
    # The most entries one read takes (XREADGROUP COUNT). A read takes what is there, so a
    # light stream is scored a few entries at a time; under load full batches amortise the
    # per-series work over a series' several readings (docs/performance.md#batch-size).
    stream_batch_count: int = Field(default=5000, ge=1, le=100_000)
    # Blocking reads must end before the client's 10 s socket timeout (a redis-py pitfall).
    stream_block_ms: int = Field(default=2000, ge=1, le=5000)
    stream_claim_idle_ms: int = Field(default=30_000, ge=1)
    stream_claim_interval_ms: int = Field(default=5000, ge=1)
    stream_max_deliveries: int = Field(default=5, ge=1)
    stream_anomalies_maxlen: int = Field(default=1_000_000, ge=1)
    stream_dead_maxlen: int = Field(default=100_000, ge=1)
    # Producers' safety cap on `readings`; keep it far above any backlog the workers may face.
    stream_readings_maxlen: int = Field(default=10_000_000, ge=1)
    stream_trim_interval_ms: int = Field(default=2000, ge=1)
    stream_record_postgres: bool = True
    # Episodes (docs/stream-contract.md): anomalies of a series closer than this in event time form
    # one episode; events gain `episode_id` and `onset`. State: one small Redis hash a series.
    episodes: bool = True
    episode_quiet_seconds: int = Field(default=3600, ge=0)
    episode_history: int = Field(default=8, ge=0, le=1000)
    # Late and out-of-order readings (docs/stream-contract.md#late-and-out-of-order-readings):
    # a stateful series' readings up to this far (event time) behind its newest are held and
    # folded in timestamp order; older ones are flagged `late`. 0: off (no hold, no flag).
    lateness_seconds: int = Field(default=0, ge=0, le=7 * 86_400)
    # A series that holds readings and received none for LATENESS_SECONDS plus this (wall
    # clock) has them folded and their events written by a worker's sweep.
    lateness_flush_seconds: float = Field(default=60.0, ge=0)
    # Silent series (docs/stream-contract.md#silent-series): a fitted series seen on the stream
    # that sends nothing for SILENCE_CADENCES of its cadence (the fit's median interval), and
    # at least SILENCE_MIN_SECONDS, of arrival time gets a `no_data` event; 0 cadences turn
    # the watch off. Every worker sweeps for overdue series every SILENCE_SWEEP_SECONDS.
    silence_cadences: float = Field(default=10.0, ge=0)
    silence_min_seconds: float = Field(default=60.0, ge=0)
    silence_sweep_seconds: float = Field(default=5.0, gt=0, le=3600)
    # Backfill (docs/stream-contract.md#backfill): a history scored through the stream
    # pipeline, its events on their own stream, its states and episodes under their own keys
    # (kept this long after the job's last chunk), its history rows marked `backfill`.
    stream_backfill: str = "anomalies:backfill"
    backfill_chunk: int = Field(default=50_000, ge=1, le=1_000_000)
    backfill_state_ttl_seconds: int = Field(default=7 * 86_400, ge=1)
    # Incidents (docs/stream-contract.md#incidents): episodes of at least INCIDENT_MIN_SERIES
    # distinct series opening within INCIDENT_WINDOW_SECONDS of each other (event time) are one
    # incident, with an `incident` event when it opens and when it closes; 0 series turn it
    # off. Every worker sweeps every INCIDENT_SWEEP_SECONDS to close a quiet incident.
    incident_min_series: int = Field(default=3, ge=0)
    # ... and at least this share of the series seen on the stream (the silence watch's):
    # a fleet's background of onsets is not an outage.
    incident_min_share: float = Field(default=0.05, ge=0, le=1)
    incident_window_seconds: int = Field(default=300, ge=1, le=86_400)
    incident_sweep_seconds: float = Field(default=5.0, gt=0, le=3600)

    # The Kafka path (``python -m detector.transports.kafka worker``): a faust app, group = app id.
    kafka_bootstrap: str = Field(
        default="kafka://127.0.0.1:9092", description="faust broker URL(s), ';'-separated."
    )
    kafka_app_id: str = "detector"
    kafka_readings_topic: str = "readings"
    kafka_anomalies_topic: str = "anomalies"
    kafka_dead_topic: str = "readings.dead"
    kafka_partitions: int = Field(default=8, ge=1, description="When faust creates the topics.")
    kafka_batch_count: int = Field(default=1000, ge=1, le=100_000)
    kafka_batch_within_seconds: float = Field(default=0.2, gt=0, le=10)
    kafka_processing_guarantee: Literal["at_least_once", "exactly_once"] = "at_least_once"
    kafka_metrics_port: int = Field(default=9102, ge=0, le=65535, description="0 disables it.")
    # A killed worker's partitions move to the others after this long without a heartbeat.
    kafka_session_timeout_seconds: float = Field(default=30.0, ge=1, le=300)

    # Retention (0 = keep forever): a background pass in the API and the worker processes,
    # one process at a time, dropping old days of the anomaly history and deleting the rest in
    # small batches.
    retention_interval_seconds: float = Field(
        default=3600.0, ge=0, description="Seconds between retention passes; 0 disables them."
    )
    retention_anomalies_days: int = Field(
        default=30,
        ge=0,
        description="Recorded anomalies of readings older than this many days (by the"
        " reading's timestamp) are removed, a whole UTC day at a time.",
    )
    retention_training_versions: int = Field(
        default=3,
        ge=0,
        description="Training points are kept for each series' newest N versions only; older"
        " versions stay listed (metadata, MLflow runs) but /plot answers 410 for them.",
    )
    retention_outbox_days: int = Field(
        default=30,
        ge=0,
        description="Fits MLflow has not taken within this many days are dropped from the"
        " outbox with a warning (their runs are never logged).",
    )
    retention_outbox_max_rows: int = Field(
        default=1_000_000,
        ge=0,
        description="At most this many fits wait for MLflow; the oldest beyond are dropped"
        " with a warning.",
    )

    # The worker process.
    model_refresh_seconds: float = Field(default=1.0, ge=0, le=5)
    worker_heartbeat_ttl_seconds: int = Field(default=15, ge=1)
    metrics_port: int = Field(default=9101, ge=0, le=65535, description="0 disables it.")

    @model_validator(mode="after")
    def _shardable_names(self) -> Settings:
        # A shard's tag must be its names' hash tag: a brace already in a name would win.
        if self.stream_shards > 1:
            for field_name in ("stream_readings", "stream_anomalies", "stream_dead"):
                name = getattr(self, field_name)
                if "{" in name or "}" in name:
                    raise ValueError(
                        f"{field_name.upper()} {name!r} has a brace: with STREAM_SHARDS above 1"
                        " the shards' hash tags are added to the names, which may have none"
                    )
        return self

    @field_validator("redis_cluster_nodes")
    @classmethod
    def _host_port_list(cls, value: str) -> str:
        for node in value.split(","):
            host, _, port = node.strip().rpartition(":")
            if value.strip() and not (host and port.isdigit() and 0 < int(port) < 65536):
                raise ValueError(
                    f"REDIS_CLUSTER_NODES takes comma-separated host:port seed nodes, not {node!r}"
                )
        return value.strip()

    def redis_cluster_seeds(self) -> list[tuple[str, int]]:
        """The seed nodes of REDIS_CLUSTER_NODES (empty: one Redis, not a cluster)."""
        seeds = []
        for node in filter(None, (n.strip() for n in self.redis_cluster_nodes.split(","))):
            host, _, port = node.rpartition(":")
            seeds.append((host.strip("[]"), int(port)))
        return seeds

    def redis_connection_url(self) -> str:
        if self.redis_url:
            return self.redis_url
        user = quote(self.redis_username, safe="") if self.redis_username else ""
        auth = f"{user}:{quote(self.redis_password, safe='')}@" if self.redis_password else ""
        return f"redis://{auth}{self.redis_host}:{self.redis_port}/{self.redis_db}"

    def postgres_conninfo(self) -> str:
        if self.postgres_dsn:
            return self.postgres_dsn
        user = quote(self.postgres_user, safe="")
        auth = (
            f"{user}:{quote(self.postgres_password, safe='')}" if self.postgres_password else user
        )
        return (
            f"postgresql://{auth}@{self.postgres_host}:{self.postgres_port}/"
            f"{quote(self.postgres_db, safe='')}"
        )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read from the environment on first use."""
    return Settings()
