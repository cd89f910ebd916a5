"""The Kafka worker's silent-series sweep: claim in Redis, produce to `anomalies`, then release.

The claim is the same atomic script as on Redis Streams (``detector.state.silence``), in lease
mode: it cannot produce to Kafka itself, so it returns the open events and leases them. The
sweep produces them, awaits the broker's acknowledgement, and only then drops the leases. A
worker that dies in between leaves the leases to run out (``LEASE_SECONDS``); the next sweep
of any worker claims them again and produces the same events (same ``source_id``): at least
once, like every event on Kafka.
"""

from __future__ import annotations

import asyncio
import logging

import faust

from detector.errors import REDIS_ERRORS, is_unavailable
from detector.metrics import WorkerMetrics
from detector.settings import Settings
from detector.shards import kafka_shards
from detector.state.silence import SilenceWatch, silence_watch
from detector.store.connections import postgres_pool, redis_client
from detector.store.models import ModelStore
from detector.transports.kafka.produce import send_events

log = logging.getLogger(__name__)


class KafkaSilenceSweep:
    """One worker's sweep (a faust timer every ``silence_sweep_seconds``), with a Redis
    client of its own; the model store is only there for the watch's interface (the sweep
    never looks a model up)."""

    def __init__(self, settings: Settings, metrics: WorkerMetrics, anomalies: faust.TopicT):
        self.settings, self.metrics, self.anomalies = settings, metrics, anomalies
        self._watches: list[SilenceWatch] | None = None

    def watches(self) -> list[SilenceWatch]:
        """One watch a key shard (``detector.shards.kafka_shards``: one on one Redis)."""
        if self._watches is None:
            client = redis_client(self.settings)
            store = ModelStore(client, postgres_pool(self.settings), cache_size=0)
            found = (
                silence_watch(self.settings, client, store, output=shard.anomalies, mode="lease")
                for shard in kafka_shards(self.settings)
            )
            self._watches = [watch for watch in found if watch is not None]
        return self._watches

    async def sweep(self) -> None:
        claimed = silent = 0
        complete = True
        for watch in self.watches():
            try:
                swept = await watch.sweep()
                sent = await send_events(self.anomalies, swept.events, "series_id")
                await asyncio.gather(*sent)  # acknowledged by the broker
                await watch.delivered(swept.events)
            except REDIS_ERRORS as exc:
                if not is_unavailable(exc):
                    raise
                # A shard on a master that is down: the others are swept all the same.
                log.warning("silence sweep skipped, Redis unavailable: %s", exc)
                complete = False
                continue
            claimed, silent = claimed + swept.claimed, silent + swept.silent
        label = self.metrics.transport
        if claimed:
            log.info("%d series went silent", claimed)
            self.metrics.no_data_events.labels(label, "open").inc(claimed)
        if complete:
            self.metrics.series_silent.labels(label).set(silent)
