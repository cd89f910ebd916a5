"""The incident rule written plainly in Python, to check the Lua script against
(``detector/scripts/incident_onsets.lua``; docs/stream-contract.md#incidents).

Event time only: the scripts also close an incident no onset joined for the window of
arrival time, which the property tests keep out of reach (they run in well under a window).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Open:
    incident_id: str
    first: int
    last: int
    members: dict[str, str]  # series → episode id
    onsets: int


@dataclass
class IncidentRule:
    window: int
    need: int
    current: Open | None = None
    last_members: dict[str, str] = field(default_factory=dict)
    pending: dict[str, tuple[int, str]] = field(default_factory=dict)  # series → (t, episode)
    # (state, incident id, series, onsets, first, last, closed_by) per event, in order.
    events: list[tuple[str, str, int, int, int, int, str | None]] = field(default_factory=list)

    def _event(self, c: Open, state: str, by: str | None = None) -> None:
        self.events.append((state, c.incident_id, len(c.members), c.onsets, c.first, c.last, by))

    def onset(self, series: str, t: int, episode: str) -> None:
        w, c = self.window, self.current
        if c is not None and t > c.last + w:
            self._event(c, "closed", "window")
            self.last_members, self.current, c = c.members, None, None
        if c is not None:
            had = c.members.get(series)
            if had == episode or t < c.first - w:
                return
            c.members[series] = episode
            c.onsets += 1
            c.first, c.last = min(c.first, t), max(c.last, t)
            return
        waiting = self.pending.get(series)
        if self.last_members.get(series) == episode or (waiting and waiting[1] == episode):
            return
        if waiting is None or t >= waiting[0]:
            self.pending[series] = (t, episode)
        newest = max(p[0] for p in self.pending.values())
        self.pending = {s: p for s, p in self.pending.items() if p[0] >= newest - w}
        if len(self.pending) >= self.need:
            times = [p[0] for p in self.pending.values()]
            self.current = Open(
                f"incident:{episode}",
                min(times),
                max(times),
                {s: p[1] for s, p in self.pending.items()},
                len(self.pending),
            )
            self.pending = {}
            self._event(self.current, "open")
