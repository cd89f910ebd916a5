"""MLflow runs of fits (blocking calls): one run a single fit, each such version in the Model
Registry; one run a bulk fit job, its versions listed in the run's ``fits.csv``."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from detector.identifiers import format_version

log = logging.getLogger(__name__)

# The tag that makes logging idempotent: a run carrying it is found again instead of duplicated
# when the process died between creating the run and recording its id in PostgreSQL. The
# creation time is part of it so a rebuilt database (ids restarting at 1) never matches old runs.
FIT_KEY_TAG = "anomaly.fit_key"
# The same for a bulk fit job's run.
JOB_KEY_TAG = "anomaly.fit_job_key"
# The artifact of a job's run listing its versions, one CSV row each.
JOB_TABLE = "fits.csv"
JOB_TABLE_COLUMNS = ("series_id", "version", "mean", "std", "sigma", "points")
# A job's run status by how the job ended ("running": its process stopped making progress).
_JOB_RUN_STATUS = {"finished": "FINISHED", "failed": "FAILED", "running": "KILLED"}


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


@dataclass(frozen=True, slots=True)
class JobRecord:
    """What MLflow is told about one bulk fit job, read from fit_jobs."""

    id: int
    attempts: int
    source: str
    kind: str
    sigma: float
    direction: str
    fitted: int
    refused: int
    points: int
    seconds: float | None
    refusals: list[dict[str, str]]
    status: str
    created_at: datetime
    ended_at: datetime

    @property
    def job_key(self) -> str:
        return f"{self.id}@{int(self.created_at.timestamp() * 1_000_000)}"

    @property
    def run_status(self) -> str:
        return _JOB_RUN_STATUS[self.status]


def registered_model_name(series_id: str) -> str:
    """One registered model per series. MLflow forbids ':' in names and series ids allow it;
    '%' never occurs in a series id, so percent-encoding keeps the mapping one-to-one."""
    return "anomaly-" + series_id.replace(":", "%3A")


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
        run_id = self._find_run(FIT_KEY_TAG, fit.fit_key) or self._create_run(fit)
        self._fill_run(run_id, fit)
        return run_id, self._register(run_id, fit)

    def log_feedback(self, run_id: str, feedback: dict[str, Any]) -> None:
        """Record one piece of feedback on the run of the version it is about: a tag
        ``feedback.<id>`` holding it as JSON (set again on a retry: idempotent) and a
        ``feedback_<label>`` metric of 1 at step ``id``."""
        self.client.set_tag(run_id, f"feedback.{feedback['id']}", json.dumps(feedback)[:5000])
        self.client.log_metric(run_id, f"feedback_{feedback['label']}", 1.0, step=feedback["id"])

    def log_job(self, job: JobRecord, table: str) -> str:
        """Log a bulk fit job as one run (reusing one left by an earlier, interrupted try):
        its options as params, its counts and time as metrics, ``table`` (a CSV of its
        versions) as the ``fits.csv`` artifact and its first refusals as ``refused.json``;
        returns the run id. Safe to repeat. Its versions are not registered one by one."""
        from mlflow.entities import Metric, Param, RunTag

        run_id = self._find_run(JOB_KEY_TAG, job.job_key)
        if run_id is None:
            run = self.client.create_run(
                self.experiment_id(),
                start_time=int(job.created_at.timestamp() * 1000),
                tags={JOB_KEY_TAG: job.job_key},
                run_name=f"bulk-fit-{job.id}",
            )
            run_id = str(run.info.run_id)
        at = int(job.ended_at.timestamp() * 1000)
        seconds = job.seconds or 0.0
        metrics = {
            "series_fitted": float(job.fitted),
            "series_refused": float(job.refused),
            "points": float(job.points),
            "seconds": seconds,
            "fits_per_second": job.fitted / seconds if seconds > 0 else 0.0,
        }
        params = {
            "job": str(job.id),
            "source": job.source,
            "kind": job.kind,
            "sigma": repr(job.sigma),
            "direction": job.direction,
            "count": str(job.fitted + job.refused),
        }
        tags = {
            "anomaly.fit_job": str(job.id),
            "anomaly.kind": job.kind,
            "anomaly.job_status": job.status,
        }
        self.client.log_batch(
            run_id,
            metrics=[Metric(k, v, at, 0) for k, v in metrics.items()],
            params=[Param(k, v) for k, v in params.items()],
            tags=[RunTag(k, v) for k, v in tags.items()],
        )
        self.client.log_artifact(run_id, table)
        self.client.log_dict(
            run_id, {"refused": job.refused, "first": job.refusals}, "refused.json"
        )
        self.client.set_terminated(run_id, job.run_status, end_time=at)
        return run_id

    def _find_run(self, tag: str, key: str) -> str | None:
        runs = self.client.search_runs(
            [self.experiment_id()], filter_string=f"tags.`{tag}` = '{key}'", max_results=1
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
            # The registry numbers versions itself; they drift from ours once a series has
            # versions from bulk fit jobs (not registered one by one), or when someone deleted
            # or added registry versions by hand, or the database was rebuilt. Each registry
            # version carries ours in its tag.
            log.info(
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


_worker_logger: MlflowLogger | None = None
_worker_args: tuple[str, str] = ("", "")


def init_worker(tracking_uri: str, experiment: str) -> None:
    global _worker_args
    _worker_args = (tracking_uri, experiment)


def log_fit(fit: FitRecord) -> tuple[str, str | None]:
    """Runs in the logging process. MLflow's exceptions do not all survive pickling back to
    the parent, so any failure crosses as a plain RuntimeError carrying its message."""
    global _worker_logger
    try:
        if _worker_logger is None:
            _worker_logger = MlflowLogger(*_worker_args)
        return _worker_logger.log_fit(fit)
    except Exception as exc:
        raise RuntimeError(brief(exc)) from None


def log_job(job: JobRecord, table: str) -> str:
    """``MlflowLogger.log_job`` in the logging process (failures as in ``log_fit``)."""
    global _worker_logger
    try:
        if _worker_logger is None:
            _worker_logger = MlflowLogger(*_worker_args)
        return _worker_logger.log_job(job, table)
    except Exception as exc:
        raise RuntimeError(brief(exc)) from None


def log_feedback(run_id: str, feedback: dict[str, Any]) -> None:
    """``MlflowLogger.log_feedback`` in the logging process (failures as in ``log_fit``)."""
    global _worker_logger
    try:
        if _worker_logger is None:
            _worker_logger = MlflowLogger(*_worker_args)
        _worker_logger.log_feedback(run_id, feedback)
    except Exception as exc:
        raise RuntimeError(brief(exc)) from None


def brief(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
