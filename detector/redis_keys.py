"""Every Redis key the service writes, in one place.

Per-series keys put the series id in braces: ids never contain braces, so the braces delimit
the id exactly (``a:latest`` is a series of its own and cannot touch the keys of ``a``), and
they are the Redis Cluster hash tag, so every key of one series lives in one slot. Stream
names (``readings``, ``anomalies``, ``readings:dead``) are settings, not built here.
"""

from __future__ import annotations

from typing import Final

# The prefix of model hashes; the API's pointer cache subscribes to changes under it.
MODEL_PREFIX: Final = "model:"


def model_key(series_id: str) -> str:
    """The series' model versions (a field per version number) and its ``latest`` pointer."""
    return f"{MODEL_PREFIX}{{{series_id}}}"


def series_of_model_key(key: bytes) -> str | None:
    """The series id of a model key, or None for any other key."""
    prefix = MODEL_PREFIX.encode() + b"{"
    if key.startswith(prefix) and key.endswith(b"}"):
        return key[len(prefix) : -1].decode()
    return None


def write_probe_key(series_id: str) -> str:
    """A short-lived key a fit writes first, to learn that Redis takes writes for the series."""
    return f"probe:{{{series_id}}}"


def state_key(series_id: str, namespace: str = "") -> str:
    """The series' streaming state of a stateful kind; ``namespace`` (a backfill job's
    ``backfill:{<job>}:``) keeps another run's state apart from the live stream's."""
    return f"{namespace}state:{{{series_id}}}"


def held_key(namespace: str = "") -> str:
    """The series whose stateful state holds readings (``detector.state.lateness``): a
    sorted set, score the wall-clock time by which the sweep folds them if nothing else has."""
    return f"{namespace}state:held"


def episode_key(series_id: str, namespace: str = "") -> str:
    """The series' current episode and a few closed ones (``namespace``: as for states)."""
    return f"{namespace}episode:{{{series_id}}}"


def feedback_key(series_id: str) -> str:
    """The series' feedback adjustment (``detector.feedback``): a hash of per-test threshold
    scales and ``through``, the newest feedback revision it was computed from."""
    return f"feedback:{{{series_id}}}"


def backfill_namespace(job: str) -> str:
    """The prefix of a backfill job's state and episode keys: the job id is their hash tag
    (the first braces of a key), so a job's batch scripts touch one slot on Redis Cluster."""
    return f"backfill:{{{job}}}:"


def attempts_key(readings_stream: str) -> str:
    """Per suspect entry id, how many times a worker took it in hand alone (a hash)."""
    return f"{readings_stream}:attempts"


def heartbeat_key(readings_stream: str, consumer: str) -> str:
    """A worker's liveness record (``detector.transports.redis.health``)."""
    return f"{readings_stream}:heartbeat:{consumer}"


def same_slot(key: str) -> str:
    """A prefix for keys that must lie in ``key``'s Redis Cluster slot: ``key`` itself when
    it has a hash tag (``readings:{a}``), else ``{key}`` (the slot of ``readings`` is that
    of the tag ``{readings}``). A name with a ``}`` but no hash tag cannot be put in braces
    whole: it is returned as it is (on a cluster, give such a stream a tag)."""
    start = key.find("{")
    if (start >= 0 and key.find("}", start + 1) > start + 1) or "}" in key:
        return key
    return f"{{{key}}}"


def producer_key(readings_stream: str, producer_id: str) -> str:
    """A publisher's last applied batch (``ingest.publisher``). One script touches it and the
    stream, so it lies in the stream's slot, whatever the stream's name."""
    return f"{same_slot(readings_stream)}:producer:{producer_id}"


def silence_key(output: str, part: str) -> str:
    """One of the silent-series watch's keys (``detector.state.silence``), named after the
    output the events go to (the anomalies stream or topic): ``deadlines`` (a sorted set),
    ``series``, ``silent`` and ``resumed`` (hashes), ``leases`` (a sorted set, Kafka only).
    They share the output's hash tag, so in Redis Cluster the sweep can add to the stream in
    the same script (``anomalies:{a}`` → ``anomalies:{a}:silence:deadlines``)."""
    return f"{output}:silence:{part}"


def incident_key(output: str, part: str) -> str:
    """One of the incident tracker's keys (``detector.state.incidents``), named after the
    output the events go to, like the silence watch's: ``current``, ``members``,
    ``last_members``, ``pending_episodes``, ``outbox`` (hashes), ``pending``, ``leases``
    (sorted sets). They share the output's hash tag, so in Redis Cluster the scripts can add
    to the stream (``anomalies:{a}`` → ``anomalies:{a}:incident:current``)."""
    return f"{output}:incident:{part}"
