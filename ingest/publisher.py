"""Publish readings to the `readings` stream: validated batches, each added at most once."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import redis
from redis.exceptions import NoScriptError, SlotNotCoveredError

from detector.errors import NotReplicatedError
from detector.redis_keys import producer_key
from detector.scripts import lua
from detector.shards import shard_of, tagged
from detector.store.connections import reread_layout_sync
from detector.store.replication import LAYOUT_CHANGED, ReplicaWait, write_then_wait
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
        self,
        producer_id: str,
        batch: int,
        readings: int,
        confirmed: int,
        cause: Exception,
        *,
        detail: str | None = None,
    ) -> None:
        super().__init__(
            f"batch {batch} of producer {producer_id} ({readings} readings) is unconfirmed: "
            + (detail or f"it may or may not have been added ({cause})")
            + f"; {confirmed} readings before it are confirmed; flush again to resend it safely"
        )
        self.producer_id, self.batch, self.readings = producer_id, batch, readings
        self.confirmed = confirmed


class NotReplicatedBatchError(UnconfirmedBatchError):
    """A batch the master added but fewer replicas than ``wait_replicas`` acknowledged in time
    (REDIS_WAIT_REPLICAS): a failover now could lose it. As for any unconfirmed batch,
    ``flush()`` sends it again (the master finds it applied and adds nothing) and waits for
    the replicas again."""

    def __init__(
        self, producer_id: str, batch: int, readings: int, confirmed: int, cause: Exception
    ) -> None:
        super().__init__(
            producer_id, batch, readings, confirmed, cause, detail=f"not on replicas ({cause})"
        )


_CONNECTION_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
# Worth the same retries: a failover in progress (CLUSTERDOWN, TRYAGAIN, a slot not served
# yet), a slot moved (MOVED, ASK, met by a write waited for on replicas), too few replicas.
_RETRIED = (*_CONNECTION_ERRORS, *LAYOUT_CHANGED, SlotNotCoveredError, NotReplicatedError)
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
    when a connection is lost mid-batch and the batch is sent again (and as long as the
    master that confirmed it lives, or had it replicated: see below). A publisher has a
    producer id (a fresh uuid4 unless given; never share one between two publishers) and
    numbers its batches 1, 2, 3 …; one Lua script adds a batch and records its number and
    entry ids, atomically, and a batch whose number was already applied is not added again:
    the script returns the ids it was given then. A lost connection (or, on a Redis Cluster,
    a failover in progress: CLUSTERDOWN, TRYAGAIN, a slot not served yet) is retried
    ``retries`` times with a doubling pause; after that ``UnconfirmedBatchError`` names the
    batch, which stays in hand for the next ``flush``. The record lives ``dedup_ttl`` seconds
    (a resend later than that adds the batch again) and is deleted when the ``with`` block
    ends cleanly. Readings published with plain ``XADD`` by other clients carry no such
    guarantee.

    Each XADD trims the stream with ``MAXLEN ~ maxlen``: a producer-side bound on memory. It
    must stay far above any backlog the workers may face, or unscored readings are dropped.

    With ``shards`` above 1 (STREAM_SHARDS, ``detector.shards``) ``stream`` names the shards:
    each reading goes to its series' shard stream (``readings:{s<k>.<j>}``), each shard has a
    buffer, batch numbers and a producer record of its own, and the guarantee holds shard by
    shard; a series' readings stay in publishing order, as they share a shard.

    Confirmed means the master applied the batch. Redis replicates asynchronously, so when a
    master dies its promoted replica may lack the batches the master confirmed last (a
    suffix: never one in the middle, and never one twice). With ``wait_replicas`` (n > 0,
    REDIS_WAIT_REPLICAS) a batch is confirmed only once n replicas acknowledged it within
    ``wait_timeout_ms`` (``detector.store.replication``); fewer is retried like a lost
    connection, then raises ``NotReplicatedBatchError``, the batch still in hand.
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
        wait_replicas: int = 0,
        wait_timeout_ms: int = 1000,
    ) -> None:
        self.client = client
        self.stream = stream
        self.shards = shards
        self.maxlen = maxlen
        self.batch_size = batch_size
        self.producer_id = producer_id or uuid.uuid4().hex
        self.retries = retries
        self.dedup_ttl = dedup_ttl
        self.wait = ReplicaWait(wait_replicas, wait_timeout_ms) if wait_replicas > 0 else None
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
                reply = self._apply(lane, args)
                break
            except _RETRIED as exc:
                if attempt == self.retries:
                    error = (
                        NotReplicatedBatchError
                        if isinstance(exc, NotReplicatedError)
                        else UnconfirmedBatchError
                    )
                    raise error(
                        self.producer_id, batch.number, len(batch.readings), self.sent, exc
                    ) from exc
                time.sleep(pause)
                pause = min(_MAX_BACKOFF, pause * 2)
        lane.in_flight = None
        self.sent += len(batch.readings)
        if not int(reply[0]):
            self.resent += 1
        return [i.decode() if isinstance(i, bytes) else str(i) for i in reply[1:]]

    def _apply(self, lane: _Lane, args: list[str | int]) -> list[Any]:
        """One attempt at the batch's script, and with ``wait`` its WAIT on the same
        connection to the stream's master."""
        if self.wait is None:
            reply: list[Any] = self._script(keys=[lane.stream, lane.key], args=args)
            return reply
        command = ("EVALSHA", self._script.sha, 2, lane.stream, lane.key, *args)
        try:
            (found,), acknowledged = write_then_wait(self.client, lane.stream, [command], self.wait)
            if isinstance(found, NoScriptError):  # a node new to the script (promoted, restarted)
                self.client.script_load(self._script.script)
                (found,), acknowledged = write_then_wait(
                    self.client, lane.stream, [command], self.wait
                )
            if isinstance(found, Exception):
                raise found
        except (*_CONNECTION_ERRORS, *LAYOUT_CHANGED, SlotNotCoveredError):
            reread_layout_sync(self.client)  # (no node answers yet: the next attempt's)
            raise
        self.wait.check(acknowledged)
        return list(found)

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
