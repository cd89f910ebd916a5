"""The Kafka wire format: JSON values carrying the Redis stream entries' fields, key = series_id."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from detector.wire.events import decode_event, number


def bootstrap_servers(url: str) -> list[str]:
    """aiokafka's ``host:port`` list from faust's broker URL (``kafka://h1:9092;h2:9092``)."""
    servers = []
    for part in url.replace(",", ";").split(";"):
        part = part.strip().removeprefix("kafka://").removeprefix("aiokafka://")
        if part:
            servers.append(part)
    return servers


def source_id(topic: str, partition: int, offset: int) -> str:
    """A record's position, ``topic/partition/offset``: unique, so the key for de-duplication."""
    return f"{topic}/{partition}/{offset}"


def fields_from_json(raw: bytes | None) -> dict[str, str] | None:
    """A reading's JSON object as the flat text fields ``parse_reading`` checks (numbers as
    text, so the Redis rules apply unchanged); None when the value is not a JSON object."""
    if raw is None:
        return None
    try:
        item: Any = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(item, dict):
        return None
    fields: dict[str, str] = {}
    for name, value in item.items():
        if isinstance(value, str):
            fields[str(name)] = value
        elif isinstance(value, bool) or value is None:
            fields[str(name)] = orjson.dumps(value).decode()  # refused by the checks
        elif isinstance(value, int):
            fields[str(name)] = str(value)
        elif isinstance(value, float):
            # A float timestamp stays "1.0" and is refused, as "1.0" is in a Redis entry.
            fields[str(name)] = number(value)
        else:
            fields[str(name)] = orjson.dumps(value).decode()
    return fields


def reading_value(fields: Mapping[str, str]) -> bytes:
    """A `readings` record value from entry fields (timestamp and value as JSON numbers)."""
    item: dict[str, Any] = dict(fields)
    timestamp, value = fields.get("timestamp"), fields.get("value")
    if timestamp is not None and timestamp.isdigit():
        item["timestamp"] = int(timestamp)
    if value is not None:
        try:
            item["value"] = float(value)
        except ValueError:
            pass  # unchecked text stays text (and a missing field stays missing): the
            # worker dead-letters it
    return orjson.dumps(item)


def event_value(fields: Mapping[str, str]) -> bytes:
    """An `anomalies` record value: the event's fields, numbers typed (``decode_event``)."""
    return orjson.dumps(decode_event(fields))


def dead_value(fields: Mapping[str, str]) -> bytes:
    """A dead-letter record value: ``DeadLetter.to_fields()``, all text as in Redis."""
    return orjson.dumps(dict(fields))
