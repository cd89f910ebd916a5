"""Service settings, read from environment variables (names as in the seed README)."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal
from urllib.parse import quote

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

Direction = Literal["above", "below", "both"]


class Settings(BaseSettings):
    """Every knob of the service.

    The fields are flat rather than nested groups because the seed README fixes the environment
    names (``REDIS_HOST``, ``POSTGRES_PORT`` …) and operators already set those; the groups show
    in the names' prefixes instead.
    """

    model_config = SettingsConfigDict(env_file=None, extra="ignore", frozen=True)

    # Redis: the hot model store and the streams.
    redis_host: str = "127.0.0.1"
    redis_port: int = 6379
    redis_db: int = 0
    redis_password: str | None = None
    redis_url: str | None = Field(default=None, description="Overrides the REDIS_* parts.")

    # PostgreSQL: the durable store, source of truth.
    postgres_host: str = "127.0.0.1"
    postgres_port: int = 5432
    postgres_db: str = "anomaly"
    postgres_user: str = "postgres"
    postgres_password: str = ""
    postgres_dsn: str | None = Field(default=None, description="Overrides the POSTGRES_* parts.")
    postgres_pool_min: int = 1
    postgres_pool_max: int = 10

    # MLflow tracking.
    mlflow_tracking_uri: str | None = None
    mlflow_experiment: str = "anomaly-detection"

    # The model.
    default_sigma: float = Field(default=3.0, gt=0)
    default_direction: Direction = "above"
    min_training_points: int = Field(default=3, ge=2)
    max_training_points: int = Field(default=5_000_000, ge=3)
    max_body_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    max_batch_points: int = Field(default=1_000_000, ge=1)
    model_cache_size: int = Field(default=200_000, ge=0)

    # The API process.
    latency_window: int = Field(default=1000, ge=1)
    plot_max_points: int = Field(default=4000, ge=100)

    def redis_connection_url(self) -> str:
        if self.redis_url:
            return self.redis_url
        auth = f":{quote(self.redis_password, safe='')}@" if self.redis_password else ""
        return f"redis://{auth}{self.redis_host}:{self.redis_port}/{self.redis_db}"

    def postgres_conninfo(self) -> str:
        if self.postgres_dsn:
            return self.postgres_dsn
        user = quote(self.postgres_user, safe="")
        auth = (
            f"{user}:{quote(self.postgres_password, safe='')}" if self.postgres_password else user
        )
        return (
            f"postgresql://{auth}@{self.postgres_host}:{self.postgres_port}/"
            f"{quote(self.postgres_db, safe='')}"
        )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read from the environment on first use."""
    return Settings()
