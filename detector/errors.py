"""The service's exception tree; `api.errors` maps it to HTTP status codes in one place."""

from __future__ import annotations

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


class TrainingDataDeletedError(AnomalyError):
    """The version exists but retention deleted its training points (HTTP 410)."""


class StoreUnavailableError(AnomalyError):
    """Redis or PostgreSQL cannot be reached (HTTP 503)."""

    def __init__(self, dependency: str, detail: str) -> None:
        super().__init__(detail)
        self.dependency = dependency


# Redis replies that mean "unavailable for now" rather than "this command is wrong": out of
# memory, a replica or a loading server, a script running too long, a cluster in transition.
_UNAVAILABLE_REPLIES = frozenset(
    {
        "OOM",
        "READONLY",
        "LOADING",
        "BUSY",
        "MASTERDOWN",
        "NOREPLICAS",
        "CLUSTERDOWN",
        "TRYAGAIN",
        "MISCONF",
    }
)


def is_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` means a dependency is unavailable (wait and retry), as opposed to a
    bug or a bad request: unreachable servers, the store's own StoreUnavailableError, and
    Redis' "not now" replies."""
    if isinstance(exc, (StoreUnavailableError, *REDIS_ERRORS, *POSTGRES_ERRORS)):
        return True
    if isinstance(exc, redis.exceptions.ResponseError):
        text = str(exc)
        # Errors raised inside a script come wrapped: "Error running script …: OOM …".
        words = {text.split(" ", 1)[0]} | {w for w in text.split() if w.isupper()}
        return bool(words & _UNAVAILABLE_REPLIES)
    return False


# Foreign errors that mean "the dependency cannot be reached": the store's boundary catches
# these and raises StoreUnavailableError, so the rest of the service catches the tree above.
REDIS_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)
POSTGRES_ERRORS = (psycopg.OperationalError, psycopg_pool.PoolTimeout, OSError)
