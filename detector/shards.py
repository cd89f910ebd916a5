"""Sharded streams: ``readings`` split into STREAM_SHARDS streams, each with its own slot.

One `readings` stream lives on one Redis node and is served by its one core. With
``STREAM_SHARDS`` = N above 1, the publisher routes each series to shard
``crc32(series_id) % N`` (so a series' readings stay on one stream, in order), and shard k's
streams and the worker's keys of its series carry the hash tag ``{s<k>}``:

- ``readings:{s<k>}``, ``anomalies:{s<k>}``, ``readings:dead:{s<k>}`` (the names of the
  settings, tagged), so a batch's commit writes its three streams in one slot;
- ``{s<k>}:readings:state:{<id>}``, ``{s<k>}:readings:episode:{<id>}``,
  ``{s<k>}:readings:state:held`` (the key namespace of ``detector.redis_keys``, after the
  readings stream), so a batch's states, episodes and held readings are one slot too, and
  the silence watch's keys follow the shard's anomalies stream.

On Redis Cluster the shards' slots spread over the masters (give N a few times the number
of masters); on one Redis sharding only splits the streams. With N = 1 every name is the
setting itself and no key changes: a deployment that never set STREAM_SHARDS sees nothing
new. Changing N moves series between shards (their states and episodes start afresh): stop
the publishers, drain the workers, then change it everywhere.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from detector.settings import Settings


@dataclass(frozen=True, slots=True)
class Shard:
    """One shard's streams and the key namespace of its series' worker state."""

    index: int
    readings: str
    anomalies: str
    dead: str
    namespace: str  # ``detector.redis_keys``' prefix for states, episodes and the held set

    @property
    def label(self) -> str:
        """The shard as logs and metrics name it."""
        return str(self.index)


def shard_tag(index: int) -> str:
    return f"{{s{index}}}"


def shard_of(series_id: str, count: int) -> int:
    """The shard of a series: the same in every process and release (CRC-32 of its id)."""
    if count <= 1:
        return 0
    return zlib.crc32(series_id.encode()) % count


def tagged(name: str, index: int, count: int) -> str:
    """Shard ``index``'s stream of the stream setting ``name`` (``name`` itself unsharded)."""
    return name if count <= 1 else f"{name}:{shard_tag(index)}"


def shard(settings: Settings, index: int) -> Shard:
    n = settings.stream_shards
    if not 0 <= index < n:
        raise ValueError(f"shard {index} of {n}")
    return Shard(
        index,
        readings=tagged(settings.stream_readings, index, n),
        anomalies=tagged(settings.stream_anomalies, index, n),
        dead=tagged(settings.stream_dead, index, n),
        namespace="" if n <= 1 else f"{shard_tag(index)}:{settings.stream_readings}:",
    )


def shards(settings: Settings) -> list[Shard]:
    """Every shard, in index order (one, the settings' own names, when unsharded)."""
    return [shard(settings, k) for k in range(settings.stream_shards)]


def readings_streams(settings: Settings) -> list[str]:
    return [s.readings for s in shards(settings)]


def anomalies_streams(settings: Settings) -> list[str]:
    """Where subscribers read: every shard's anomalies stream."""
    return [s.anomalies for s in shards(settings)]


def series_shard(settings: Settings, series_id: str) -> Shard:
    """The shard a series' readings go to."""
    return shard(settings, shard_of(series_id, settings.stream_shards))
