"""The Kafka worker's incident sweep: close a quiet incident, record it, produce it, release.

The sweep script is the one the Redis worker runs (``detector.state.incidents``), in lease
mode: it returns the closed event (and any event whose lease ran out: its worker died before
producing it) instead of writing to a stream. The sweep records them in PostgreSQL, produces
them, awaits the broker's acknowledgement, and only then takes them out of the outbox: at
least once, like every event on Kafka (de-duplicate on ``source_id``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import faust
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from detector.errors import POSTGRES_ERRORS, REDIS_ERRORS, is_unavailable
from detector.metrics import WorkerMetrics
from detector.redis_keys import silence_key
from detector.settings import Settings
from detector.shards import Shard, kafka_shards
from detector.state.incidents import IncidentTracker, incident_tracker
from detector.store.connections import postgres_pool, redis_client
from detector.store.incidents import record_incidents
from detector.transports.kafka.produce import send_events

log = logging.getLogger(__name__)


class KafkaIncidentSweep:
    """One worker's sweep (a faust timer every ``incident_sweep_seconds``), with a Redis
    client and a PostgreSQL pool of its own."""

    def __init__(self, settings: Settings, metrics: WorkerMetrics, anomalies: faust.TopicT):
        self.settings, self.metrics, self.anomalies = settings, metrics, anomalies
        self._tracker: IncidentTracker | None = None
        self._pool: AsyncConnectionPool | None = None

    async def _open(self) -> tuple[IncidentTracker | None, AsyncConnectionPool]:
        if self._pool is None:
            self._pool = postgres_pool(self.settings)
            await self._pool.open(wait=False)
            self._tracker = kafka_incident_tracker(
                self.settings,
                redis_client(self.settings),
                kafka_shards(self.settings),
                f"kafka:{self.anomalies.get_topic_name()}",
            )
        return self._tracker, self._pool

    async def sweep(self) -> None:
        tracker, pool = await self._open()
        if tracker is None:
            return
        try:
            changes = await tracker.sweep()
            if changes.events and self.settings.stream_record_postgres:
                await record_incidents(pool, tracker.source, changes.rows())
            sent = await send_events(self.anomalies, changes.events, "incident_id")
            await asyncio.gather(*sent)  # acknowledged by the broker
            await tracker.delivered(changes.events)
        except (*REDIS_ERRORS, *POSTGRES_ERRORS) as exc:
            if not is_unavailable(exc):
                raise
            # The events stay leased; once the lease runs out a later sweep takes them again.
            log.warning("incident sweep skipped, a store is unavailable: %s", exc)
            return
        self.metrics.incidents_active.labels(self.metrics.transport).set(changes.active)


def kafka_incident_tracker(
    settings: Settings, client: Redis, shards: Sequence[Shard], source: str
) -> IncidentTracker | None:
    """The Kafka worker's incident tracker (lease mode): fleet-wide, its keys named after
    the first shard's output (the anomalies topic on one Redis), the fleet every shard's
    watched series when there are several."""
    return incident_tracker(
        settings,
        client,
        output=shards[0].anomalies,
        source=source,
        mode="lease",
        fleet=[silence_key(s.anomalies, "series") for s in shards] if len(shards) > 1 else None,
    )
