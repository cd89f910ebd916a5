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
from detector.state.silence import SilenceWatch, silence_watch
from detector.store.connections import postgres_pool, redis_client
from detector.store.models import ModelStore
from detector.wire.kafka import event_value

log = logging.getLogger(__name__)


class KafkaSilenceSweep:
    """One worker's sweep (a faust timer every ``silence_sweep_seconds``), with a Redis
    client of its own; the model store is only there for the watch's interface (the sweep
    never looks a model up)."""

    def __init__(self, settings: Settings, metrics: WorkerMetrics, anomalies: faust.TopicT):
        self.settings, self.metrics, self.anomalies = settings, metrics, anomalies
        self._watch: SilenceWatch | None = None

    def watch(self) -> SilenceWatch | None:
        if self._watch is None:
            client = redis_client(self.settings)
            store = ModelStore(client, postgres_pool(self.settings), cache_size=0)
            self._watch = silence_watch(
                self.settings,
                client,
                store,
                output=self.anomalies.get_topic_name(),
                mode="lease",
            )
        return self._watch

    async def sweep(self) -> None:
        watch = self.watch()
        if watch is None:
            return
        try:
            swept = await watch.sweep()
            sent = [
                await self.anomalies.send(
                    key=event["series_id"].encode(), value=event_value(event), force=True
                )
                for event in swept.events
            ]
            await asyncio.gather(*sent)  # acknowledged by the broker
            await watch.delivered(swept.events)
        except REDIS_ERRORS as exc:
            if not is_unavailable(exc):
                raise
            log.warning("silence sweep skipped, Redis unavailable: %s", exc)
            return
        label = self.metrics.transport
        if swept.claimed:
            log.info("%d series went silent", swept.claimed)
            self.metrics.no_data_events.labels(label, "open").inc(swept.claimed)
        self.metrics.series_silent.labels(label).set(swept.silent)
