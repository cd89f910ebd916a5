"""MLflow tracking off the request path: drains the PostgreSQL outbox into one MLflow run a
single fit, and each finished bulk fit job (``fit_jobs``) into one run for the job (the runs
themselves: ``detector.mlflow_runs``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import tempfile
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import psycopg
from prometheus_client import CollectorRegistry, Counter, Gauge
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from detector.errors import POSTGRES_ERRORS
from detector.identifiers import format_version
from detector.mlflow_runs import (
    JOB_TABLE,
    JOB_TABLE_COLUMNS,
    FitRecord,
    JobRecord,
    brief,
    init_worker,
    log_feedback,
    log_fit,
    log_job,
)
from detector.settings import Settings

log = logging.getLogger(__name__)

# Oldest first, one series' versions strictly in order (a later version waits while an earlier
# one is still in the outbox), so registry version numbers are assigned in our order. Only each
# series' oldest row is a candidate: DISTINCT ON walks the (series_id, version) index once,
# where a per-row "no earlier version waiting" check cost a join per waiting row (seconds with
# 100,000 rows waiting while MLflow is down).
_CLAIM = """
SELECT o.model_id, o.attempts, m.series_id, m.version, m.kind, m.mean, m.std, m.sigma,
       m.direction, m.points_used, m.first_ts, m.last_ts, m.min_value, m.max_value, m.created_at
FROM (
    SELECT DISTINCT ON (series_id) model_id, next_try
    FROM mlflow_outbox
    ORDER BY series_id, version
) head
JOIN mlflow_outbox o ON o.model_id = head.model_id
JOIN model_versions m ON m.id = o.model_id
WHERE head.next_try <= now()
ORDER BY o.model_id
LIMIT 1
FOR UPDATE OF o SKIP LOCKED
"""


# Feedback not yet on the MLflow run of its version, once that run exists (a fit still in the
# outbox has none yet: its feedback waits for it).
_CLAIM_FEEDBACK = """
SELECT f.id, f.series_id, f.episode_id, f.label, f.test, f.model_version, f.from_ts, f.to_ts,
       f.note, f.mlflow_attempts, coalesce(m.mlflow_run_id, j.mlflow_run_id) AS mlflow_run_id
FROM feedback f
JOIN model_versions m ON m.series_id = f.series_id AND m.version = f.model_version
LEFT JOIN fit_jobs j ON j.id = m.fit_job
WHERE f.mlflow_logged_at IS NULL AND f.mlflow_next_try <= now()
  AND coalesce(m.mlflow_run_id, j.mlflow_run_id) IS NOT NULL
ORDER BY f.mlflow_next_try, f.id
LIMIT 1
FOR UPDATE OF f SKIP LOCKED
"""


# Bulk fit jobs whose run is due: finished (or failed), or still marked running but without a
# committed batch for JOB_STALE_SECONDS (the process that ran it stopped): logged as killed.
JOB_COLUMNS = """
id, mlflow_attempts AS attempts, source, kind, sigma, direction, fitted, refused, points,
seconds, refusals, status, created_at, coalesce(finished_at, updated_at) AS ended_at
"""
_CLAIM_JOB = f"""
SELECT {JOB_COLUMNS}
FROM fit_jobs
WHERE mlflow_run_id IS NULL AND mlflow_next_try <= now()
  AND (status <> 'running' OR updated_at < now() - make_interval(secs => %(stale)s))
ORDER BY id
LIMIT 1
FOR UPDATE SKIP LOCKED
"""  # noqa: S608 (constant)
JOB_STALE_SECONDS = 900.0

# A job's versions as its run's table (``mlflow_runs.JOB_TABLE_COLUMNS``).
_JOB_TABLE = """
COPY (SELECT series_id, version, mean, std, sigma, points_used FROM model_versions
      WHERE fit_job = %s ORDER BY id) TO STDOUT (FORMAT CSV)
"""


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
            initializer=init_worker,
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
        for process in (self._process_one, self._process_job, self._process_feedback):
            while logged < self.batch_size:
                outcome = await process()
                if outcome is None:
                    break
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
                run_id, registered = await loop.run_in_executor(self._executor, log_fit, fit)
            except Exception as exc:  # any MLflow failure (HTTP, SQL, artifacts): retry later
                if isinstance(exc, BrokenProcessPool):  # the logging process died: renew it
                    self._executor = self._new_executor()
                delay = retry_delay(fit.attempts + 1, cap=self.max_retry_delay)
                await conn.execute(
                    "UPDATE mlflow_outbox SET attempts = attempts + 1, last_error = %s,"
                    " next_try = now() + make_interval(secs => %s) WHERE model_id = %s",
                    (brief(exc)[:2000], delay, fit.model_id),
                )
                log.warning(
                    "MLflow logging of %s %s failed (attempt %d, next in %.0f s): %s",
                    fit.series_id,
                    format_version(fit.version),
                    fit.attempts + 1,
                    delay,
                    brief(exc),
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

    async def _process_job(self) -> bool | None:
        """None when no bulk fit job is due, else whether the claimed job's run was logged
        (``fit_jobs.mlflow_run_id``); a failure backs off as fits do."""
        async with self.pool.connection() as conn, conn.transaction():
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(_CLAIM_JOB, {"stale": JOB_STALE_SECONDS})
            row = await cur.fetchone()
            if row is None:
                return None
            job = JobRecord(**row)
            loop = asyncio.get_running_loop()
            with tempfile.TemporaryDirectory(prefix="fit-job-") as folder:
                table = Path(folder) / JOB_TABLE
                await write_job_table(conn, job.id, table)
                try:
                    run_id = await loop.run_in_executor(self._executor, log_job, job, str(table))
                except Exception as exc:  # as for a fit: retry later
                    if isinstance(exc, BrokenProcessPool):
                        self._executor = self._new_executor()
                    delay = retry_delay(job.attempts + 1, cap=self.max_retry_delay)
                    await conn.execute(
                        "UPDATE fit_jobs SET mlflow_attempts = mlflow_attempts + 1,"
                        " mlflow_error = %s, mlflow_next_try = now() + make_interval(secs => %s)"
                        " WHERE id = %s",
                        (brief(exc)[:2000], delay, job.id),
                    )
                    log.warning("MLflow logging of bulk fit job %d failed: %s", job.id, brief(exc))
                    if self.metrics:
                        self.metrics.runs.labels("failed").inc()
                    return False
            await conn.execute(
                "UPDATE fit_jobs SET mlflow_run_id = %s, mlflow_error = NULL WHERE id = %s",
                (run_id, job.id),
            )
        log.info("logged bulk fit job %d (%d series) to MLflow run %s", job.id, job.fitted, run_id)
        if self.metrics:
            self.metrics.runs.labels("logged").inc()
        return True

    async def _process_feedback(self) -> bool | None:
        """None when no feedback is due, else whether the claimed row was recorded on its
        version's run (``feedback.mlflow_logged_at``); a failure backs off as fits do."""
        async with self.pool.connection() as conn, conn.transaction():
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(_CLAIM_FEEDBACK)
            row = await cur.fetchone()
            if row is None:
                return None
            run_id = row.pop("mlflow_run_id")
            attempts = row.pop("mlflow_attempts")
            row["model_version"] = format_version(int(row["model_version"]))
            loop = asyncio.get_running_loop()
            try:
                await loop.run_in_executor(self._executor, log_feedback, run_id, row)
            except Exception as exc:  # as for a fit: retry later
                if isinstance(exc, BrokenProcessPool):
                    self._executor = self._new_executor()
                delay = retry_delay(attempts + 1, cap=self.max_retry_delay)
                await conn.execute(
                    "UPDATE feedback SET mlflow_attempts = mlflow_attempts + 1,"
                    " mlflow_error = %s, mlflow_next_try = now() + make_interval(secs => %s)"
                    " WHERE id = %s",
                    (brief(exc)[:2000], delay, row["id"]),
                )
                log.warning("MLflow logging of feedback %d failed: %s", row["id"], brief(exc))
                if self.metrics:
                    self.metrics.runs.labels("failed").inc()
                return False
            await conn.execute(
                "UPDATE feedback SET mlflow_logged_at = now(), mlflow_error = NULL WHERE id = %s",
                (row["id"],),
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


async def write_job_table(conn: psycopg.AsyncConnection[Any], job: int, path: Path) -> None:
    """The job's versions as a CSV file with a header, streamed from PostgreSQL (a million
    versions are about 60 MB; nothing holds them all in memory)."""
    with path.open("wb") as out:
        out.write((",".join(JOB_TABLE_COLUMNS) + "\n").encode())
        async with conn.cursor().copy(_JOB_TABLE, (job,)) as copy:
            async for chunk in copy:
                out.write(chunk)


# The logging process's own MlflowLogger (one per process; see MlflowTracker._new_executor).
