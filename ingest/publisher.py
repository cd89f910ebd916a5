"""Publish readings to the `readings` stream: validated batches, each added at most once."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import redis

from detector.redis_keys import producer_key
from detector.scripts import lua
from detector.shards import shard_of, tagged
from detector.wire.events import number
from detector.wire.readings import DeadLetter, parse_reading


class InvalidReadingError(ValueError):
    """A reading the worker would dead-letter; raised before anything is sent."""


class UnconfirmedBatchError(redis.exceptions.ConnectionError):
    """Redis could not be reached to confirm a batch: it may or may not have been added.

    The batch stays in hand: ``flush()`` sends it again (under the same number, so it is
    added at most once) before anything published since.
    """

    def __init__(
        self, producer_id: str, batch: int, readings: int, confirmed: int, cause: Exception
    ) -> None:
        super().__init__(
            f"batch {batch} of producer {producer_id} ({readings} readings) is unconfirmed: "
            f"it may or may not have been added ({cause}); {confirmed} readings before it are "
            "confirmed; flush again to resend it safely"
        )
        self.producer_id, self.batch, self.readings = producer_id, batch, readings
        self.confirmed = confirmed


_CONNECTION_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
_FIRST_BACKOFF, _MAX_BACKOFF = 0.1, 2.0


@dataclass(frozen=True, slots=True)
class _Batch:
    number: int
    readings: list[dict[str, str]]


@dataclass(slots=True)
class _Lane:
    """One stream's buffer, the batch in flight to it and its producer record."""

    stream: str
    key: str
    buffer: list[dict[str, str]]
    in_flight: _Batch | None = None
    last_batch: int = 0


def checked_fields(
    series_id: str, timestamp: Any, value: Any, version: str | None = None
) -> dict[str, str]:
    """The entry fields of a reading, validated with the worker's own rules."""
    numeric = isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(timestamp, float) and timestamp.is_integer():
        timestamp = int(timestamp)  # a JSON 1.0 is the integer 1, as in a fit's body
    fields = {
        "series_id": str(series_id),
        "timestamp": str(timestamp),
        "value": number(value) if numeric else str(value),
    }
    if version:
        fields["version"] = str(version)
    parsed = parse_reading("-", fields)
    if isinstance(parsed, DeadLetter):
        raise InvalidReadingError(parsed.detail)
    return fields


class Publisher:
    """Buffers readings and adds them to the stream in batches of ``batch_size``.

    Guarantee: every reading that ``publish`` accepted and a later ``flush`` (or the end of
    the ``with`` block) confirmed is in the stream exactly once, in publishing order, even
    when a connection is lost mid-batch and the batch is sent again. A publisher has a
    producer id (a fresh uuid4 unless given; never share one between two publishers) and
    numbers its batches 1, 2, 3 …; one Lua script adds a batch and records its number and
    entry ids, atomically, and a batch whose number was already applied is not added again:
    the script returns the ids it was given then. A lost connection is retried ``retries``
    times with a doubling pause; after that ``UnconfirmedBatchError`` names the batch, which
    stays in hand for the next ``flush``. The record lives ``dedup_ttl`` seconds (a resend
    later than that adds the batch again) and is deleted when the ``with`` block ends
    cleanly. Readings published with plain ``XADD`` by other clients carry no such
    guarantee.

    Each XADD trims the stream with ``MAXLEN ~ maxlen``: a producer-side bound on memory. It
    must stay far above any backlog the workers may face, or unscored readings are dropped.

    With ``shards`` above 1 (STREAM_SHARDS, ``detector.shards``) ``stream`` names the shards:
    each reading goes to its series' shard stream (``readings:{s<k>}``), each shard has a
    buffer, batch numbers and a producer record of its own, and the guarantee holds shard by
    shard; a series' readings stay in publishing order, as they share a shard.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        stream: str = "readings",
        maxlen: int = 10_000_000,
        batch_size: int = 1000,
        producer_id: str | None = None,
        retries: int = 5,
        dedup_ttl: int = 86_400,
        shards: int = 1,
    ) -> None:
        self.client = client
        self.stream = stream
        self.shards = shards
        self.maxlen = maxlen
        self.batch_size = batch_size
        self.producer_id = producer_id or uuid.uuid4().hex
        self.retries = retries
        self.dedup_ttl = dedup_ttl
        self.sent = 0
        self.resent = 0  # batches found already applied on a retry
        self._lanes = [
            _Lane(name, producer_key(name, self.producer_id), [])
            for name in (tagged(stream, k, shards) for k in range(shards))
        ]
        self._script = client.register_script(lua("publish_batch"))

    @property
    def key(self) -> str:
        """The producer record (of the first shard's stream, when sharded)."""
        return self._lanes[0].key

    def _lane(self, fields: dict[str, str]) -> _Lane:
        if self.shards <= 1:
            return self._lanes[0]
        return self._lanes[shard_of(fields["series_id"], self.shards)]

    def publish(
        self, series_id: str, timestamp: int | str, value: float | str, version: str | None = None
    ) -> None:
        """Queue one reading (validated now: a bad one raises InvalidReadingError)."""
        self.publish_fields(checked_fields(series_id, timestamp, value, version))

    def publish_fields(self, fields: dict[str, str]) -> None:
        """Queue entry fields that are already checked (see ``checked_fields``)."""
        lane = self._lane(fields)
        lane.buffer.append(fields)
        if len(lane.buffer) >= self.batch_size:
            self._flush_lane(lane)

    def publish_many(self, readings: Iterable[tuple[str, int, float]]) -> int:
        count = 0
        for series_id, timestamp, value in readings:
            self.publish(series_id, timestamp, value)
            count += 1
        self.flush()
        return count

    def flush(self) -> list[str]:
        """Send an unconfirmed batch left by an earlier failure, then what is buffered, one
        round trip a batch (a shard); returns the entry ids of the readings confirmed now
        (shard by shard when sharded)."""
        ids: list[str] = []
        for lane in self._lanes:
            ids += self._flush_lane(lane)
        return ids

    def _flush_lane(self, lane: _Lane) -> list[str]:
        ids: list[str] = []
        if lane.in_flight is not None:
            ids += self._send(lane, lane.in_flight)
        if lane.buffer:
            lane.last_batch += 1
            # Frozen from here on: a resend must carry exactly these readings.
            lane.in_flight = _Batch(lane.last_batch, lane.buffer)
            lane.buffer = []
            ids += self._send(lane, lane.in_flight)
        return ids

    def close(self) -> None:
        """Send what is buffered, then drop the producer's records (no resend can follow)."""
        self.flush()
        for lane in self._lanes:
            if lane.last_batch:
                try:
                    self.client.delete(lane.key)
                except _CONNECTION_ERRORS:
                    pass  # its TTL removes it

    def _send(self, lane: _Lane, batch: _Batch) -> list[str]:
        args: list[str | int] = [batch.number, self.dedup_ttl, self.maxlen, len(batch.readings)]
        for fields in batch.readings:
            args.append(len(fields))
            for name, value in fields.items():
                args += (name, value)
        pause = _FIRST_BACKOFF
        for attempt in range(self.retries + 1):
            try:
                reply: list[Any] = self._script(keys=[lane.stream, lane.key], args=args)
                break
            except _CONNECTION_ERRORS as exc:
                if attempt == self.retries:
                    raise UnconfirmedBatchError(
                        self.producer_id, batch.number, len(batch.readings), self.sent, exc
                    ) from exc
                time.sleep(pause)
                pause = min(_MAX_BACKOFF, pause * 2)
        lane.in_flight = None
        self.sent += len(batch.readings)
        if not int(reply[0]):
            self.resent += 1
        return [i.decode() if isinstance(i, bytes) else str(i) for i in reply[1:]]

    def __enter__(self) -> Publisher:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
