"""MLflow tracking off the request path: drains the PostgreSQL outbox into one MLflow run a fit."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import psycopg
from prometheus_client import CollectorRegistry, Counter, Gauge
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from detector.errors import POSTGRES_ERRORS
from detector.identifiers import format_version
from detector.settings import Settings

log = logging.getLogger(__name__)

# The tag that makes logging idempotent: a run carrying it is found again instead of duplicated
# when the process died between creating the run and recording its id in PostgreSQL. The
# creation time is part of it so a rebuilt database (ids restarting at 1) never matches old runs.
FIT_KEY_TAG = "anomaly.fit_key"

# Oldest first, one series' versions strictly in order (a later version waits while an earlier
# one is still in the outbox), so registry version numbers are assigned in our order.
_CLAIM = """
SELECT o.model_id, o.attempts, m.series_id, m.version, m.kind, m.mean, m.std, m.sigma,
       m.direction, m.points_used, m.first_ts, m.last_ts, m.min_value, m.max_value, m.created_at
FROM mlflow_outbox o
JOIN model_versions m ON m.id = o.model_id
WHERE o.next_try <= now()
  AND NOT EXISTS (
      SELECT 1 FROM mlflow_outbox eo JOIN model_versions em ON em.id = eo.model_id
      WHERE em.series_id = m.series_id AND em.version < m.version)
ORDER BY o.model_id
LIMIT 1
FOR UPDATE OF o SKIP LOCKED
"""


@dataclass(frozen=True, slots=True)
class FitRecord:
    """What MLflow is told about one fit, read from model_versions."""

    model_id: int
    attempts: int
    series_id: str
    version: int
    kind: str
    mean: float
    std: float
    sigma: float
    direction: str
    points_used: int
    first_ts: int
    last_ts: int
    min_value: float
    max_value: float
    created_at: datetime

    @property
    def fit_key(self) -> str:
        return f"{self.model_id}@{int(self.created_at.timestamp() * 1_000_000)}"

    @property
    def timestamp_ms(self) -> int:
        return int(self.created_at.timestamp() * 1000)

    def summary(self) -> dict[str, Any]:
        return {
            "series_id": self.series_id,
            "version": format_version(self.version),
            "points": self.points_used,
            "first_timestamp": self.first_ts,
            "last_timestamp": self.last_ts,
            "min": self.min_value,
            "max": self.max_value,
            "mean": self.mean,
            "std": self.std,
        }

    def model(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "mean": self.mean,
            "std": self.std,
            "sigma": self.sigma,
            "direction": self.direction,
            "lower": self.mean - self.sigma * self.std,
            "upper": self.mean + self.sigma * self.std,
        }


def registered_model_name(series_id: str) -> str:
    """One registered model per series. MLflow forbids ':' in names and series ids allow it;
    '%' never occurs in a series id, so percent-encoding keeps the mapping one-to-one."""
    return "anomaly-" + series_id.replace(":", "%3A")


def retry_delay(attempts: int, *, base: float = 2.0, cap: float = 300.0) -> float:
    """Seconds before the next try of an outbox row that has failed ``attempts`` times."""
    return float(min(cap, base * 2 ** max(0, attempts - 1)))


class TrackerMetrics:
    """The tracker's own metrics, on the API's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.runs = Counter(
            "mlflow_outbox_runs",
            "Outbox entries processed, by outcome (logged or failed).",
            ["outcome"],
            registry=registry,
        )
        self.pending = Gauge(
            "mlflow_outbox_pending", "Fits waiting to be logged to MLflow.", registry=registry
        )
        for outcome in ("logged", "failed"):
            self.runs.labels(outcome)


class MlflowLogger:
    """The blocking MLflow side: never call it on the event loop."""

    def __init__(self, tracking_uri: str, experiment: str) -> None:
        from mlflow import MlflowClient  # imported here: mlflow takes ~1 s to import

        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        self._experiment_id: str | None = None

    def experiment_id(self) -> str:
        if self._experiment_id is None:
            from mlflow.exceptions import MlflowException

            found = self.client.get_experiment_by_name(self.experiment)
            if found is None:
                try:
                    self._experiment_id = self.client.create_experiment(
                        self.experiment,
                        artifact_location=local_artifact_location(self.tracking_uri),
                    )
                except MlflowException as exc:
                    if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                        raise
                    # Another API process created it first.
                    found = self.client.get_experiment_by_name(self.experiment)
                    assert found is not None
                    self._experiment_id = found.experiment_id
            else:
                self._experiment_id = found.experiment_id
        return self._experiment_id

    def log_fit(self, fit: FitRecord) -> tuple[str, str | None]:
        """Log the fit's run (reusing one left by an earlier, interrupted try) and register
        its version; returns (run id, registered version or None). Safe to repeat."""
        run_id = self._find_run(fit) or self._create_run(fit)
        self._fill_run(run_id, fit)
        return run_id, self._register(run_id, fit)

    def _find_run(self, fit: FitRecord) -> str | None:
        runs = self.client.search_runs(
            [self.experiment_id()],
            filter_string=f"tags.`{FIT_KEY_TAG}` = '{fit.fit_key}'",
            max_results=1,
        )
        return runs[0].info.run_id if runs else None

    def _create_run(self, fit: FitRecord) -> str:
        run = self.client.create_run(
            self.experiment_id(),
            start_time=fit.timestamp_ms,
            tags={FIT_KEY_TAG: fit.fit_key},
            run_name=f"{fit.series_id}-{format_version(fit.version)}",
        )
        return str(run.info.run_id)

    def _fill_run(self, run_id: str, fit: FitRecord) -> None:
        from mlflow.entities import Metric, Param, RunTag

        # Fixed timestamps and step: a repeated try writes identical rows, which MLflow keeps
        # once, and identical params, which it accepts.
        at = fit.timestamp_ms
        metrics = {
            "mean": fit.mean,
            "std": fit.std,
            "min": fit.min_value,
            "max": fit.max_value,
            "points": float(fit.points_used),
        }
        params = {
            "series_id": fit.series_id,
            "version": format_version(fit.version),
            "sigma": repr(fit.sigma),
            "direction": fit.direction,
            "points": str(fit.points_used),
            "kind": fit.kind,
        }
        tags = {
            "anomaly.series_id": fit.series_id,
            "anomaly.version": str(fit.version),
            "anomaly.model_id": str(fit.model_id),
            "anomaly.kind": fit.kind,
        }
        self.client.log_batch(
            run_id,
            metrics=[Metric(k, v, at, 0) for k, v in metrics.items()],
            params=[Param(k, v) for k, v in params.items()],
            tags=[RunTag(k, v) for k, v in tags.items()],
        )
        self.client.log_dict(run_id, fit.summary(), "training_summary.json")
        self.client.log_dict(run_id, fit.model(), "model/model.json")
        self.client.set_terminated(run_id, "FINISHED", end_time=at)

    def _register(self, run_id: str, fit: FitRecord) -> str | None:
        from mlflow.exceptions import MlflowException

        name = registered_model_name(fit.series_id)
        existing = self.client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
        if existing:
            return str(existing[0].version)
        try:
            self.client.create_registered_model(name, tags={"anomaly.series_id": fit.series_id})
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        run = self.client.get_run(run_id)
        created = self.client.create_model_version(
            name,
            source=f"{run.info.artifact_uri}/model",
            run_id=run_id,
            tags={"anomaly.version": str(fit.version)},
            await_creation_for=0,
        )
        if str(created.version) != str(fit.version):
            # The registry numbers versions itself; they drift from ours only if someone
            # deleted or added registry versions by hand, or the database was rebuilt.
            log.warning(
                "registry version %s of %s does not match our %s",
                created.version,
                name,
                format_version(fit.version),
            )
        return str(created.version)


def local_artifact_location(tracking_uri: str) -> str | None:
    """Where a local (sqlite or file) store keeps artifacts; None lets a server decide.

    Without this MLflow would write ``./mlruns`` into whatever directory the API runs in.
    """
    parsed = urlparse(tracking_uri)
    if parsed.scheme in ("http", "https", "databricks"):
        return None
    explicit = os.environ.get("MLFLOW_ARTIFACTS_DESTINATION")
    if explicit:
        return Path(explicit).resolve().as_uri()
    if parsed.scheme == "sqlite":
        database = unquote(tracking_uri.removeprefix("sqlite:///"))
        return (Path(database).resolve().parent / "mlartifacts").as_uri()
    return None


class MlflowTracker:
    """Claims due outbox rows, logs each to MLflow in a worker thread, records the run id.

    A row stays locked (FOR UPDATE SKIP LOCKED) while its run is logged, so several API
    processes can drain one outbox without logging a fit twice; a failure leaves the row in
    place with a growing ``next_try``.
    """

    def __init__(
        self,
        pool: AsyncConnectionPool,
        *,
        tracking_uri: str,
        experiment: str,
        registry: CollectorRegistry | None = None,
        poll_interval: float = 1.0,
        batch_size: int = 50,
        max_retry_delay: float = 300.0,
    ) -> None:
        # The outbox does the retrying; MLflow's own default (7 retries with exponential
        # back-off, ~4 minutes) would hold a row's lock and the worker thread that long.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
        self.pool = pool
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.poll_interval = poll_interval
        self.batch_size = batch_size
        self.max_retry_delay = max_retry_delay
        self.metrics = TrackerMetrics(registry) if registry is not None else None
        self._executor = self._new_executor()
        self._task: asyncio.Task[None] | None = None

    def _new_executor(self) -> ProcessPoolExecutor:
        # A process, not a thread: logging a run is ~100 ms of Python (SQLAlchemy, protobuf)
        # that would hold the API's GIL and slow the fits and predictions it serves meanwhile.
        # Spawned, because forking a process that runs an event loop and threads is unsafe.
        return ProcessPoolExecutor(
            max_workers=1,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(self.tracking_uri, self.experiment),
        )

    @classmethod
    def from_settings(
        cls, settings: Settings, pool: AsyncConnectionPool, registry: CollectorRegistry | None
    ) -> MlflowTracker | None:
        """A tracker, or None when no tracking URI is configured (tracking disabled)."""
        if not settings.mlflow_tracking_uri:
            return None
        return cls(
            pool,
            tracking_uri=settings.mlflow_tracking_uri,
            experiment=settings.mlflow_experiment,
            registry=registry,
        )

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="mlflow-tracker")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        # Let a call in flight finish briefly so the logging process exits cleanly; past that it
        # is abandoned: its row's lock goes with the connection and whoever drains next finds
        # the run by its tag.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True), 10
            )

    async def run(self) -> None:
        """Drain forever: right away while there is a backlog, else every poll interval."""
        failures = 0
        while True:
            try:
                logged, failed = await self.drain_once()
                await self._refresh_pending()
            except (*POSTGRES_ERRORS, psycopg.Error) as exc:
                log.warning("MLflow outbox: PostgreSQL unavailable: %s", exc)
                logged, failed = 0, True
            failures = failures + 1 if failed else 0
            if logged >= self.batch_size and not failed:
                continue
            delay = self.poll_interval * 2 ** min(failures, 6)
            await asyncio.sleep(min(delay, self.max_retry_delay))

    async def drain_once(self) -> tuple[int, bool]:
        """Log up to batch_size due fits; stops at the first failure (MLflow is likely down,
        so the other rows would fail too). Returns (fits logged, whether one failed)."""
        logged = 0
        while logged < self.batch_size:
            outcome = await self._process_one()
            if outcome is None:
                return logged, False
            if not outcome:
                return logged, True
            logged += 1
        return logged, False

    # ------------------------------------------------------------------ one row

    async def _process_one(self) -> bool | None:
        """None when nothing is due, else whether the claimed row was logged."""
        async with self.pool.connection() as conn, conn.transaction():
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(_CLAIM)
            row = await cur.fetchone()
            if row is None:
                return None
            fit = FitRecord(**row)
            loop = asyncio.get_running_loop()
            try:
                run_id, registered = await loop.run_in_executor(self._executor, _log_fit, fit)
            except Exception as exc:  # any MLflow failure (HTTP, SQL, artifacts): retry later
                if isinstance(exc, BrokenProcessPool):  # the logging process died: renew it
                    self._executor = self._new_executor()
                delay = retry_delay(fit.attempts + 1, cap=self.max_retry_delay)
                await conn.execute(
                    "UPDATE mlflow_outbox SET attempts = attempts + 1, last_error = %s,"
                    " next_try = now() + make_interval(secs => %s) WHERE model_id = %s",
                    (_brief(exc)[:2000], delay, fit.model_id),
                )
                log.warning(
                    "MLflow logging of %s %s failed (attempt %d, next in %.0f s): %s",
                    fit.series_id,
                    format_version(fit.version),
                    fit.attempts + 1,
                    delay,
                    _brief(exc),
                )
                if self.metrics:
                    self.metrics.runs.labels("failed").inc()
                return False
            await conn.execute(
                "UPDATE model_versions SET mlflow_run_id = %s WHERE id = %s",
                (run_id, fit.model_id),
            )
            await conn.execute("DELETE FROM mlflow_outbox WHERE model_id = %s", (fit.model_id,))
        log.info(
            "logged %s %s to MLflow run %s (registry version %s)",
            fit.series_id,
            format_version(fit.version),
            run_id,
            registered,
        )
        if self.metrics:
            self.metrics.runs.labels("logged").inc()
        return True

    async def _refresh_pending(self) -> None:
        if self.metrics is None:
            return
        async with self.pool.connection() as conn:
            cur = await conn.execute("SELECT count(*) FROM mlflow_outbox")
            row = await cur.fetchone()
        self.metrics.pending.set(int(row[0]) if row else 0)


# The logging process's own MlflowLogger (one per process; see MlflowTracker._new_executor).
_worker_logger: MlflowLogger | None = None
_worker_args: tuple[str, str] = ("", "")


def _init_worker(tracking_uri: str, experiment: str) -> None:
    global _worker_args
    _worker_args = (tracking_uri, experiment)


def _log_fit(fit: FitRecord) -> tuple[str, str | None]:
    """Runs in the logging process. MLflow's exceptions do not all survive pickling back to
    the parent, so any failure crosses as a plain RuntimeError carrying its message."""
    global _worker_logger
    try:
        if _worker_logger is None:
            _worker_logger = MlflowLogger(*_worker_args)
        return _worker_logger.log_fit(fit)
    except Exception as exc:
        raise RuntimeError(_brief(exc)) from None


def _brief(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
