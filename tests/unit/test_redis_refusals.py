"""Which Redis errors mean "unavailable, try again" (a 503, a waiting worker) and which are bugs."""

from __future__ import annotations

import os

import pytest
import redis.exceptions as rx

from detector.errors import (
    NotReplicatedError,
    describe_redis_error,
    redis_unavailable,
    torn_connection,
)

REFUSED = [
    rx.OutOfMemoryError("command not allowed when used memory > 'maxmemory'."),
    rx.ReadOnlyError("You can't write against a read only replica."),
    rx.BusyLoadingError("Redis is loading the dataset in memory"),
    rx.ResponseError("MASTERDOWN Link with MASTER is down and replica-serve-stale-data is no"),
    rx.ResponseError("BUSY Redis is busy running a script."),
    rx.ResponseError("MISCONF Redis is configured to save RDB snapshots, but it's failing"),
    rx.ResponseError("UNBLOCKED force unblock from blocking operation, instance state changed"),
    # Redis 6.2 wraps a refusal met inside a script.
    rx.ResponseError(
        "Error running script (call to f_0a1b): @user_script:6: @user_script: 6: -OOM command"
        " not allowed when used memory > 'maxmemory'."
    ),
    rx.ConnectionError("Connection refused"),
    rx.TimeoutError("Timeout reading"),
    # A Redis Cluster client's own: a cluster in transition, a slot no node serves, and no
    # node reached at all (the connection error is the cause).
    rx.ClusterDownError("The cluster is down"),
    rx.MasterDownError("Link with MASTER is down"),
    rx.TryAgainError("Multiple keys request during rehashing of slot"),
    rx.ClusterError("TTL exhausted."),
    rx.SlotNotCoveredError('Slot "12" is not covered by the cluster.'),
    # Met by a write sent to one node's connection to be waited for on replicas: the slot
    # moved (a failover), and too few replicas acknowledged (REDIS_WAIT_REPLICAS).
    rx.MovedError("3999 127.0.0.1:6381"),
    rx.AskError("3999 127.0.0.1:6381"),
    NotReplicatedError("only 0 of the 1 replicas asked for acknowledged it within 1000 ms"),
]


def _unreachable_cluster() -> Exception:
    try:
        try:
            raise rx.ConnectionError("Connection refused")
        except rx.ConnectionError as cause:
            raise rx.RedisClusterException("Redis Cluster cannot be connected.") from cause
    except rx.RedisClusterException as exc:
        return exc


REFUSED.append(_unreachable_cluster())
BUGS = [
    rx.ResponseError("BUSYGROUP Consumer Group name already exists"),
    rx.ResponseError("BUSYKEY Target key name already exists."),
    rx.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"),
    rx.NoScriptError("No matching script. Please use EVAL."),
    rx.ResponseError("ERR syntax error"),
    rx.RedisClusterException("EVALSHA - all keys must map to the same key slot"),
    rx.ResponseError("CROSSSLOT Keys in request don't hash to the same slot"),
]


@pytest.mark.parametrize("exc", REFUSED, ids=lambda e: str(e)[:24])
def test_refusals_mean_unavailable(exc: Exception) -> None:
    assert redis_unavailable(exc)


@pytest.mark.parametrize("exc", BUGS, ids=lambda e: str(e)[:24])
def test_other_replies_are_not_hidden(exc: Exception) -> None:
    assert not redis_unavailable(exc)


def test_the_description_keeps_the_code_redis_py_strips() -> None:
    assert describe_redis_error(REFUSED[0]).startswith("OOM command not allowed")
    assert describe_redis_error(REFUSED[1]).startswith("READONLY You can't write")


def test_cluster_codes_are_put_back_too() -> None:
    assert describe_redis_error(rx.TryAgainError("Multiple keys")).startswith("TRYAGAIN ")


def _raised_in(filename: str) -> AttributeError:
    """The AttributeError a line of ``filename`` raises (a frame of that file on top)."""
    try:
        exec(compile("None.writelines([])", filename, "exec"))
    except AttributeError as exc:
        return exc
    raise AssertionError("no error")


def test_a_connection_torn_down_inside_redis_py_is_redis_unavailable() -> None:
    # redis-py's asyncio cluster client marks every connection for a reconnect when it reads
    # the layout again; a command connecting meanwhile finds its writer gone.
    torn = _raised_in(os.path.join("site-packages", "redis", "asyncio", "connection.py"))
    assert torn_connection(torn) and redis_unavailable(torn)
    # The same error raised by our own code is a bug, never waited out.
    ours = _raised_in(os.path.join("detector", "transports", "redis", "worker.py"))
    assert not torn_connection(ours) and not redis_unavailable(ours)
    assert not torn_connection(ValueError("writelines"))
