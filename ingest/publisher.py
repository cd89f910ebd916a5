"""Publish readings to the `readings` stream: validated, pipelined XADD batches, MAXLEN ~ trim."""

from __future__ import annotations

from collections.abc import Iterable
from types import TracebackType
from typing import Any

import redis

from detector.wire.events import number
from detector.wire.readings import DeadLetter, parse_reading


class InvalidReadingError(ValueError):
    """A reading the worker would dead-letter; raised before anything is sent."""


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
    """Buffers readings and sends them in pipelined batches of ``batch_size`` XADDs.

    Each XADD trims the stream with ``MAXLEN ~ maxlen``: a producer-side bound on memory. It
    must stay far above any backlog the workers may face, or unscored readings are dropped.
    Use as a context manager (or call ``flush``) so the last partial batch is sent.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        stream: str = "readings",
        maxlen: int = 10_000_000,
        batch_size: int = 1000,
    ) -> None:
        self.client = client
        self.stream = stream
        self.maxlen = maxlen
        self.batch_size = batch_size
        self.sent = 0
        self._buffer: list[dict[str, str]] = []

    def publish(
        self, series_id: str, timestamp: int | str, value: float | str, version: str | None = None
    ) -> None:
        """Queue one reading (validated now: a bad one raises InvalidReadingError)."""
        self._buffer.append(checked_fields(series_id, timestamp, value, version))
        if len(self._buffer) >= self.batch_size:
            self.flush()

    def publish_fields(self, fields: dict[str, str]) -> None:
        """Queue entry fields that are already checked (see ``checked_fields``)."""
        self._buffer.append(fields)
        if len(self._buffer) >= self.batch_size:
            self.flush()

    def publish_many(self, readings: Iterable[tuple[str, int, float]]) -> int:
        count = 0
        for series_id, timestamp, value in readings:
            self.publish(series_id, timestamp, value)
            count += 1
        self.flush()
        return count

    def flush(self) -> list[str]:
        """Send what is buffered in one round trip; returns the new entry ids."""
        if not self._buffer:
            return []
        with self.client.pipeline(transaction=False) as pipe:
            for fields in self._buffer:
                pipe.xadd(self.stream, fields, maxlen=self.maxlen, approximate=True)  # type: ignore[arg-type]
            ids = [str(i) for i in pipe.execute()]
        self.sent += len(self._buffer)
        self._buffer.clear()
        return ids

    def __enter__(self) -> Publisher:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.flush()
