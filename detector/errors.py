"""The service's exception tree; `api.errors` maps it to HTTP status codes in one place."""

from __future__ import annotations

import os
import re

import psycopg
import psycopg_pool
import redis.exceptions


class AnomalyError(Exception):
    """Base of every error the service raises on purpose."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class InvalidInputError(AnomalyError):
    """The caller sent something the rules reject (HTTP 422)."""


class InvalidSeriesError(InvalidInputError):
    """A series id outside the allowed alphabet or length."""


class InvalidVersionError(InvalidInputError):
    """A model version that is not of the form v3.0.0, v3 or 3."""


class InvalidTrainingDataError(InvalidInputError):
    """Training data that cannot make a model (too few points, constant, duplicates …)."""


class TooLargeError(AnomalyError):
    """A request over a configured size limit (HTTP 413)."""


class ModelNotFoundError(AnomalyError):
    """No model for that series, or not that version (HTTP 404)."""


class EpisodeNotFoundError(ModelNotFoundError):
    """No recorded episode of that id (HTTP 404, as an unknown series)."""


class TrainingDataDeletedError(AnomalyError):
    """The version exists but retention deleted its training points (HTTP 410)."""


class NotOnClusterError(AnomalyError):
    """What does not run on Redis Cluster (HTTP 501; docs/operations.md#redis-cluster)."""


class StoreUnavailableError(AnomalyError):
    """Redis or PostgreSQL cannot be reached (HTTP 503)."""

    def __init__(self, dependency: str, detail: str) -> None:
        super().__init__(detail)
        self.dependency = dependency


class StoreRefusedError(StoreUnavailableError):
    """PostgreSQL refused a fit's commit itself (a constraint, a trigger), rather than being
    out of reach: the same rows would be refused again (HTTP 503, as any store failure). A
    bulk fit tells the series apart by storing the batch's halves (``detector.bulk_fit``)
    under the version numbers allocated for them (``versions``, in the fits' order)."""

    def __init__(self, dependency: str, detail: str, versions: list[int]) -> None:
        super().__init__(dependency, detail)
        self.versions = versions


class NotReplicatedError(redis.exceptions.RedisError):
    """A write the Redis master applied, but fewer replicas than REDIS_WAIT_REPLICAS
    acknowledged within REDIS_WAIT_TIMEOUT_MS (``detector.store.replication``): a failover now
    could lose it. For the service it is Redis unavailable, as Redis' own NOREPLICAS is."""


# Foreign errors that mean "the dependency cannot be reached": the store's boundary catches
# these and raises StoreUnavailableError, so the rest of the service catches the tree above.
# A Redis Cluster client adds its own: too many redirections or lost nodes in a row
# (ClusterError, which CLUSTERDOWN and MASTERDOWN replies are too), a slot no node serves.
# A write confirmed on too few replicas (NotReplicatedError) counts as one too.
REDIS_ERRORS = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    OSError,
    redis.exceptions.ClusterError,
    redis.exceptions.SlotNotCoveredError,
    NotReplicatedError,
)
POSTGRES_ERRORS = (psycopg.OperationalError, psycopg_pool.PoolTimeout, OSError)

# A reachable Redis that refuses a command for now, not for what it is: out of memory under
# `noeviction` (OOM), a read-only replica (READONLY), loading its data (LOADING), a replica
# whose primary is down (MASTERDOWN), a script running too long (BUSY), failing to persist
# (MISCONF), a blocked read cut off because the server became a replica (UNBLOCKED), a
# cluster in transition (CLUSTERDOWN, TRYAGAIN) or short of replicas (NOREPLICAS). Like a
# dropped connection they mean "try again later": a 503, a worker that waits.
# Catch REDIS_FAILURES, then ask ``redis_unavailable``: any other ResponseError is a bug.
# A cluster client that reaches no node raises RedisClusterException, caused by the
# connection error; raised for anything else (keys of several slots in one script) it is a bug.
REDIS_FAILURES = (
    *REDIS_ERRORS,
    redis.exceptions.ResponseError,
    redis.exceptions.RedisClusterException,
)
# redis-py strips the code from the replies it has a class for; inside a script Redis 6.2
# wraps the reply ("Error running script (…): @user_script:6: -OOM command not allowed …").
_REFUSED_CLASSES: dict[type[redis.exceptions.RedisError], str] = {
    redis.exceptions.OutOfMemoryError: "OOM",
    redis.exceptions.ReadOnlyError: "READONLY",
    redis.exceptions.BusyLoadingError: "LOADING",
    redis.exceptions.ClusterDownError: "CLUSTERDOWN",
    redis.exceptions.MasterDownError: "MASTERDOWN",
    redis.exceptions.TryAgainError: "TRYAGAIN",
    # A cluster client follows these itself; a write sent to one node's connection (a write
    # waited for on replicas, ``detector.store.replication``) meets them after a failover.
    redis.exceptions.MovedError: "MOVED",
    redis.exceptions.AskError: "ASK",
}
_REFUSED_REPLY = re.compile(
    r"(?:^|: -?)"
    r"(?:OOM|READONLY|LOADING|MASTERDOWN|BUSY|MISCONF|UNBLOCKED|CLUSTERDOWN|TRYAGAIN|NOREPLICAS) "
)


def torn_connection(exc: BaseException) -> bool:
    """Whether ``exc`` is redis-py's own connection torn down under a command: a cluster
    client's layout refresh marks every connection for a reconnect, and a command that was
    connecting meanwhile finds its writer gone (``AttributeError: 'NoneType' object has no
    attribute 'writelines'`` inside ``redis/asyncio/connection.py``). A lost connection, not
    a bug of ours."""
    if not isinstance(exc, AttributeError):
        return False
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code.co_filename.endswith(_REDIS_CONNECTION_FILES)


_REDIS_CONNECTION_FILES = (
    os.path.join("redis", "asyncio", "connection.py"),
    os.path.join("redis", "connection.py"),
)


def redis_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` means Redis cannot serve now: unreachable, or refusing (see above)."""
    if isinstance(exc, REDIS_ERRORS) or type(exc) in _REFUSED_CLASSES or torn_connection(exc):
        return True
    if isinstance(exc, redis.exceptions.RedisClusterException):
        return isinstance(exc.__cause__, REDIS_ERRORS)
    return (
        isinstance(exc, redis.exceptions.ResponseError)
        and _REFUSED_REPLY.search(str(exc)) is not None
    )


def describe_redis_error(exc: BaseException) -> str:
    """The first line of a Redis error, with the reply's code (OOM, READONLY …) put back."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    code = _REFUSED_CLASSES.get(type(exc))  # type: ignore[arg-type]
    return f"{code} {text}" if code else text


def is_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` means a dependency is unavailable (wait and retry), as opposed to a
    bug or a bad request: the store's own StoreUnavailableError, PostgreSQL unreachable, or
    Redis unreachable or refusing for now (``redis_unavailable``)."""
    return isinstance(exc, (StoreUnavailableError, *POSTGRES_ERRORS)) or redis_unavailable(exc)
