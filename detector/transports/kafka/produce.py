"""Producing events to a topic, keyed so that a series' (or an incident's) stay in order."""

from __future__ import annotations

from collections.abc import Awaitable, Iterable, Mapping
from typing import Any

import faust

from detector.wire.kafka import event_value


async def send_events(
    topic: faust.TopicT, events: Iterable[Mapping[str, str]], key: str
) -> list[Awaitable[Any]]:
    """Send ``events`` to ``topic`` keyed by their field ``key`` (``series_id``,
    ``incident_id``); returns the futures of the broker's acknowledgements, to await (all
    of a batch's at once) before anything is released or committed."""
    return [
        await topic.send(key=event[key].encode(), value=event_value(event), force=True)
        for event in events
    ]
