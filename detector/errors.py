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


# Foreign errors that mean "the dependency cannot be reached": the store's boundary catches
# these and raises StoreUnavailableError, so the rest of the service catches the tree above.
REDIS_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)
POSTGRES_ERRORS = (psycopg.OperationalError, psycopg_pool.PoolTimeout, OSError)
