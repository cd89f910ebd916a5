"""The reorder buffer of a stateful series: which readings are folded now, held, or late.

A stateful kind's result depends on the order it folds a series' readings in, and readings
come out of order (several producers, retries, a gateway that batches). With a tolerance L
(``LATENESS_SECONDS``, event time) a series' state keeps the newest timestamp it has seen
and a small buffer: a reading is **held** while it is newer than the **watermark**
(newest − L), and folded in timestamp order once the watermark passes it, so readings
shuffled by up to L give the same state and events as in order. A reading that arrives
already behind the watermark (or behind a reading folded before it) is **late**: scored
against the state as it stands, without changing it, flagged, and never an alert.

The buffer lives in the series' state in Redis (``SeriesState.held``), so held readings are
acknowledged on the stream like any other: the state is written with the same
compare-and-set as the fold. Their events are written with the batch whose reading moved the
watermark past them (the **carrier**), so the commit that writes them is the one that
acknowledges that reading, and a redelivered carrier emits them again (the stored outcome
names its carrier).

Bounded: at most ``MAX_HELD`` readings a series (about 40 bytes each in the state); past it
the oldest are folded at once, as if the watermark had passed them, and a reading older than
them that arrives later is late. A series that stops reporting would keep its last readings
held: ``SeriesStates.flush`` (a Redis worker's sweep) folds them once it has had no reading
for the tolerance plus ``LATENESS_FLUSH_SECONDS`` of wall time, writing their events itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from detector.state.series import SeriesState, StreamReading

# Readings a series may hold (keeps its state far below 4 KB: ~40 bytes each).
MAX_HELD = 32


@dataclass(slots=True)
class Release:
    """What one batch does with a series' fresh readings: ``ready`` to fold now, in
    timestamp order (held ones and fresh ones), ``late`` ones, and the ``carrier``, the
    fresh on-time reading that writes the events of held readings released here."""

    ready: list[StreamReading] = field(default_factory=list)
    late: list[StreamReading] = field(default_factory=list)
    carrier: StreamReading | None = None


def release(
    state: SeriesState,
    fresh: Sequence[StreamReading],
    tolerance: int,
    *,
    flush: str | None = None,
) -> Release:
    """Split ``fresh`` (readings never seen before, in delivery order) into on-time and late,
    add the on-time ones to the state's buffer, and take out of it what the watermark now
    passes (updating ``state.newest``, ``through`` and ``held`` in place).

    A reading is late when its timestamp is below the watermark at its arrival (newest seen
    before it, in delivery order, minus ``tolerance``) or below the newest reading already
    folded. A tolerance of 0 with readings still held (the tolerance was lowered) releases
    them all. ``flush`` (the series id) releases every held reading with no carrier: the
    sweep of a series that stopped reporting writes their events itself."""
    from detector.state.series import StreamReading, entry_order

    out = Release()
    if not fresh and not state.held:
        return out
    if flush is not None:
        out.ready = [
            StreamReading(str(sid), flush, int(t), float(v), state.version, state.kind)
            for sid, t, v in state.held
        ]
        if out.ready:
            last = max(r.timestamp for r in out.ready)
            state.through = last if state.through is None else max(state.through, last)
        state.held = []
        return out
    newest, through = state.newest, state.through
    on_time: list[StreamReading] = []
    for r in fresh:
        floor = None if newest is None else newest - tolerance
        if through is not None and (floor is None or through > floor):
            floor = through
        if floor is not None and r.timestamp < floor:
            out.late.append(r)
            continue
        on_time.append(r)
        newest = r.timestamp if newest is None else max(newest, r.timestamp)
    if not on_time:  # the watermark did not move: nothing to release, nobody to carry it
        return out
    out.carrier = on_time[-1]
    template = on_time[-1]
    buffer = [
        StreamReading(
            str(sid), template.series_id, int(t), float(v), template.version, template.kind
        )
        for sid, t, v in state.held
    ]
    buffer += on_time
    buffer.sort(key=lambda r: (r.timestamp, entry_order(r.source_id)))
    assert newest is not None
    watermark = newest - tolerance
    cut = 0
    while cut < len(buffer) and buffer[cut].timestamp <= watermark:
        cut += 1
    cut = max(cut, len(buffer) - MAX_HELD)  # over the cap: the oldest are folded now
    out.ready, kept = buffer[:cut], buffer[cut:]
    if out.ready:
        last = out.ready[-1].timestamp
        through = last if through is None else max(through, last)
    state.newest, state.through = newest, through
    state.held = [[r.source_id, r.timestamp, r.value] for r in kept]
    return out
