"""Publish readings to and tail anomaly events from Kafka topics (aiokafka), as on Redis."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Collection, Iterator
from types import TracebackType
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from detector.wire.events import ANOMALY, decode_event, wanted
from detector.wire.kafka import bootstrap_servers, fields_from_json, reading_value, source_id
from ingest.publisher import checked_fields


class KafkaPublisher:
    """``Publisher``'s interface on a Kafka topic: records keyed by series_id (a series stays on
    one partition, in order), JSON values, sent in batches of ``batch_size`` and awaited."""

    def __init__(self, bootstrap: str, *, topic: str = "readings", batch_size: int = 1000) -> None:
        self.topic = topic
        self.batch_size = batch_size
        self.sent = 0
        self._buffer: list[dict[str, str]] = []
        self._loop = asyncio.new_event_loop()
        try:
            self._producer = self._loop.run_until_complete(self._start(bootstrap))
        except BaseException:
            self._loop.close()
            raise

    @staticmethod
    async def _start(bootstrap: str) -> AIOKafkaProducer:
        # Built inside the loop (aiokafka binds to the running loop); acks="all": a reading
        # counts as sent only once the broker has it.
        producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap_servers(bootstrap), acks="all", linger_ms=5
        )
        try:
            await producer.start()
        except BaseException:
            await producer.stop()
            raise
        return producer

    def publish(
        self, series_id: str, timestamp: int | str, value: float | str, version: str | None = None
    ) -> None:
        """Queue one reading (validated now: a bad one raises InvalidReadingError)."""
        self.publish_fields(checked_fields(series_id, timestamp, value, version))

    def publish_fields(self, fields: dict[str, str]) -> None:
        self._buffer.append(fields)
        if len(self._buffer) >= self.batch_size:
            self.flush()

    def flush(self) -> list[str]:
        """Send what is buffered and wait for the broker; returns the records' source ids."""
        if not self._buffer:
            return []
        ids = self._loop.run_until_complete(self._send(self._buffer))
        self.sent += len(self._buffer)
        self._buffer.clear()
        return ids

    async def _send(self, batch: list[dict[str, str]]) -> list[str]:
        futures = [
            await self._producer.send(
                self.topic, key=fields["series_id"].encode(), value=reading_value(fields)
            )
            for fields in batch
        ]
        sent = await asyncio.gather(*futures)
        return [source_id(m.topic, m.partition, m.offset) for m in sent]

    def close(self) -> None:
        self._loop.run_until_complete(self._producer.stop())
        self._loop.close()

    def __enter__(self) -> KafkaPublisher:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc_type is None:
                self.flush()
        finally:
            self.close()


class KafkaSubscriber:
    """``Subscriber``'s interface on the `anomalies` topic: events as dicts, plus ``id``
    (``topic/partition/offset``). Without ``group`` it reads from the end (or the start) and
    commits nothing; with ``group`` the position is the group's, committed after each event
    the caller has taken. ``types`` as for ``Subscriber`` (by default anomalies only)."""

    def __init__(
        self,
        bootstrap: str,
        *,
        topic: str = "anomalies",
        from_start: bool = False,
        series_id: str | None = None,
        group: str | None = None,
        types: Collection[str] = (ANOMALY,),
    ) -> None:
        self.bootstrap = bootstrap
        self.types = frozenset(types)
        self.topic = topic
        self.from_start = from_start
        self.series_id = series_id
        self.group = group

    async def _start(self) -> AIOKafkaConsumer:
        consumer = AIOKafkaConsumer(
            self.topic,
            bootstrap_servers=bootstrap_servers(self.bootstrap),
            group_id=self.group,
            client_id=f"anomaly-ingest-{uuid.uuid4().hex[:8]}",
            auto_offset_reset="earliest" if self.from_start else "latest",
            enable_auto_commit=False,
        )
        try:
            await consumer.start()
        except BaseException:
            await consumer.stop()
            raise
        return consumer

    def events(
        self, *, limit: int | None = None, idle_timeout: float | None = None
    ) -> Iterator[dict[str, Any]]:
        """Events as they come; stops after ``limit`` events or ``idle_timeout`` s of quiet."""
        loop = asyncio.new_event_loop()
        try:
            consumer = loop.run_until_complete(self._start())
        except BaseException:
            loop.close()
            raise
        try:
            produced = 0
            last_event = time.monotonic()
            while True:
                batches: Any = loop.run_until_complete(consumer.getmany(timeout_ms=500))
                records = [r for rs in batches.values() for r in rs]
                if not records:
                    if idle_timeout is not None and time.monotonic() - last_event >= idle_timeout:
                        return
                    continue
                last_event = time.monotonic()
                for record in records:
                    fields = fields_from_json(record.value) or {}
                    if wanted(fields, self.types, self.series_id):
                        event_id = source_id(record.topic, record.partition, record.offset)
                        yield {"id": event_id, **decode_event(fields)}
                        produced += 1
                    if self.group is not None:
                        loop.run_until_complete(
                            consumer.commit(
                                {TopicPartition(record.topic, record.partition): record.offset + 1}
                            )
                        )
                    if limit is not None and produced >= limit:
                        return
        finally:
            loop.run_until_complete(consumer.stop())
            loop.close()
