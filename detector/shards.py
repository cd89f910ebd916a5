"""Sharded streams: ``readings`` split into STREAM_SHARDS streams, each with its own slot.

One `readings` stream lives on one Redis node and is served by its one core. With
``STREAM_SHARDS`` = N above 1, the publisher routes each series to shard
``crc32(series_id) % N`` (so a series' readings stay on one stream, in order), and shard k's
streams and the worker's keys of its series carry its hash tag ``{s<k>.<j>}`` (``shard_tag``:
the shards' slots spread evenly over the slot space):

- ``readings:{s<k>.<j>}``, ``anomalies:{s<k>.<j>}``, ``readings:dead:{s<k>.<j>}`` (the names of the
  settings, tagged), so a batch's commit writes its three streams in one slot;
- ``{s<k>.<j>}:readings:state:{<id>}``, ``{s<k>.<j>}:readings:episode:{<id>}``,
  ``{s<k>.<j>}:readings:state:held`` (the key namespace of ``detector.redis_keys``, after the
  readings stream), so a batch's states, episodes and held readings are one slot too, and
  the silence watch's keys follow the shard's anomalies stream.

On Redis Cluster the shards' slots spread over the masters (give N a few times the number
of masters); on one Redis sharding only splits the streams. With N = 1 every name is the
setting itself and no key changes: a deployment that never set STREAM_SHARDS sees nothing
new. Changing N moves series between shards (their states and episodes start afresh): stop
the publishers, drain the workers, then change it everywhere.
"""

from __future__ import annotations

import itertools
import zlib
from dataclasses import dataclass
from functools import cache

from redis.crc import REDIS_CLUSTER_HASH_SLOTS as _SLOTS
from redis.crc import key_slot

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


@cache
def shard_tag(index: int, count: int) -> str:
    """Shard ``index`` of ``count``'s hash tag, braces included: ``{s<index>.<j>}`` with the
    smallest ``j`` whose slot lies in the index-th count-th of the slot space. A cluster's
    masters usually own equal ranges of slots (as ``redis-cli --cluster create`` splits
    them), so the shards spread over them evenly (with N a multiple of the masters, N/masters
    each), where tags of consecutive numbers alone fall where their hashes land (six of them
    4, 1 and 1 on three masters)."""
    low, high = index * _SLOTS // count, (index + 1) * _SLOTS // count
    for j in itertools.count():
        tag = f"s{index}.{j}"
        if low <= key_slot(tag.encode()) < high:
            return f"{{{tag}}}"
    raise AssertionError("unreachable")  # pragma: no cover


def shard_of(series_id: str, count: int) -> int:
    """The shard of a series: the same in every process and release (CRC-32 of its id)."""
    if count <= 1:
        return 0
    return zlib.crc32(series_id.encode()) % count


def tagged(name: str, index: int, count: int) -> str:
    """Shard ``index``'s stream of the stream setting ``name`` (``name`` itself unsharded)."""
    return name if count <= 1 else f"{name}:{shard_tag(index, count)}"


def shard(settings: Settings, index: int) -> Shard:
    """Shard ``index`` of the Redis Streams' STREAM_SHARDS."""
    return _shard(
        index,
        settings.stream_shards,
        settings.stream_readings,
        settings.stream_anomalies,
        settings.stream_dead,
    )


def _shard(index: int, n: int, readings: str, anomalies: str, dead: str) -> Shard:
    if not 0 <= index < n:
        raise ValueError(f"shard {index} of {n}")
    return Shard(
        index,
        readings=tagged(readings, index, n),
        anomalies=tagged(anomalies, index, n),
        dead=tagged(dead, index, n),
        namespace="" if n <= 1 else f"{shard_tag(index, n)}:{readings}:",
    )


def kafka_shards(settings: Settings) -> list[Shard]:
    """The Kafka worker's key shards. Its streams are topics, but its series' worker keys
    (states, episodes, the held set) and its silence and incident keys are in Redis: on Redis
    Cluster they are split into STREAM_SHARDS shards as the Redis Streams' are (each series
    in shard ``shard_of``, its keys under the shard's hash tag, the topics' names standing for
    the streams' in the key names), so the worker runs a batch's scripts a shard at a time,
    each in one slot. On one Redis: one shard, the keys as they always were."""
    n = settings.stream_shards if settings.redis_cluster_nodes else 1
    topics = (
        settings.kafka_readings_topic,
        settings.kafka_anomalies_topic,
        settings.kafka_dead_topic,
    )
    return [_shard(k, n, *topics) for k in range(n)]


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
