"""MLflow tracking through the outbox, against a real local MLflow store and the real API."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from mlflow import MlflowClient

from detector.mlflow_outbox import retry_delay
from detector.mlflow_runs import (
    FIT_KEY_TAG,
    FitRecord,
    MlflowLogger,
    local_artifact_location,
    registered_model_name,
)
from detector.settings import Settings
from detector.store.connections import apply_schema_sync
from embedded.processes import free_port
from tests.support.polling import wait_for
from tests.support.services import start_api

EXPERIMENT = "anomaly-test"


@pytest.fixture(scope="module")
def tracking_settings(settings: Settings) -> Iterator[Settings]:
    """A database of its own: the API started here drains only this module's outbox, not the
    fits every other test leaves behind in the shared one."""
    name = f"tracking_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(settings.postgres_conninfo(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    own = settings.model_copy(update={"postgres_db": name})
    apply_schema_sync(own.postgres_conninfo())
    yield own


@pytest.fixture
def mlflow_store(tmp_path: Path) -> dict[str, str]:
    return {
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "MLFLOW_ARTIFACTS_DESTINATION": str(tmp_path / "artifacts"),
        "MLFLOW_EXPERIMENT": EXPERIMENT,
    }


def fit(base_url: str, series_id: str, values: list[float], **extra: object) -> dict[str, Any]:
    body = {"timestamps": list(range(1, len(values) + 1)), "values": values, **extra}
    r = httpx.post(f"{base_url}/fit/{series_id}", json=body, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def run_ids(base_url: str, series_id: str) -> list[str | None]:
    r = httpx.get(f"{base_url}/models/{series_id}", timeout=10)
    assert r.status_code == 200, r.text
    return [v["mlflow_run_id"] for v in r.json()["versions"]]


def logged_run_ids(base_url: str, series_id: str) -> list[str | None] | None:
    """The run ids once every version has one."""
    ids = run_ids(base_url, series_id)
    return ids if all(ids) else None


def outbox_rows(conninfo: str, series_id: str) -> list[tuple[int, int, str | None]]:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        return conn.execute(
            "SELECT m.version, o.attempts, o.last_error FROM mlflow_outbox o"
            " JOIN model_versions m ON m.id = o.model_id WHERE m.series_id = %s"
            " ORDER BY m.version",
            (series_id,),
        ).fetchall()


def fit_record(conninfo: str, series_id: str, version: int) -> FitRecord:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        cur = conn.cursor(row_factory=psycopg.rows.dict_row)
        row = cur.execute(
            "SELECT o.model_id, o.attempts, m.series_id, m.version, m.kind, m.mean, m.std,"
            " m.sigma, m.direction, m.points_used, m.first_ts, m.last_ts, m.min_value,"
            " m.max_value, m.created_at FROM mlflow_outbox o"
            " JOIN model_versions m ON m.id = o.model_id"
            " WHERE m.series_id = %s AND m.version = %s",
            (series_id, version),
        ).fetchone()
    assert row is not None
    return FitRecord(**row)


def runs_of(client: MlflowClient, series_id: str) -> list[Any]:
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None
    return client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`anomaly.series_id` = '{series_id}'",
        order_by=["params.version ASC"],
    )


def stop(proc: Any) -> None:
    proc.terminate()
    proc.wait(30)


def test_fit_is_logged_once_with_params_metrics_and_registry(
    tracking_settings: Settings, mlflow_store: dict[str, str], series_id: str
) -> None:
    proc, base_url = start_api(tracking_settings, **mlflow_store)
    try:
        fitted = fit(base_url, series_id, [1.0, 2.0, 4.0, 9.0], sigma=2.5, direction="both")
        assert fitted["version"] == "v1.0.0"
        (run_id,) = wait_for(lambda: logged_run_ids(base_url, series_id), "the run id")
    finally:
        stop(proc)

    client = MlflowClient(tracking_uri=mlflow_store["MLFLOW_TRACKING_URI"])
    (run,) = runs_of(client, series_id)
    assert run.info.run_id == run_id
    assert run.info.status == "FINISHED"
    assert run.data.params == {
        "series_id": series_id,
        "version": "v1.0.0",
        "sigma": "2.5",
        "direction": "both",
        "points": "4",
        "kind": "static",
    }
    assert run.data.metrics["mean"] == pytest.approx(4.0)
    assert run.data.metrics["std"] == pytest.approx(fitted["std"])
    assert run.data.metrics["min"] == 1.0
    assert run.data.metrics["max"] == 9.0
    assert run.data.tags["anomaly.version"] == "1"
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"training_summary.json", "model"} <= artifacts
    (registered,) = client.search_model_versions(f"name = '{registered_model_name(series_id)}'")
    assert (int(registered.version), registered.run_id) == (1, run_id)
    assert outbox_rows(tracking_settings.postgres_conninfo(), series_id) == []


def test_mlflow_outage_keeps_the_outbox_and_logs_each_fit_once_later(
    tracking_settings: Settings, mlflow_store: dict[str, str], series_id: str
) -> None:
    conninfo = tracking_settings.postgres_conninfo()
    unreachable = {**mlflow_store, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"}
    proc, base_url = start_api(tracking_settings, **unreachable)
    try:
        fit(base_url, series_id, [1.0, 2.0, 3.0])
        fit(base_url, series_id, [5.0, 6.0, 8.0])
        assert run_ids(base_url, series_id) == [None, None]
        # v1 is tried and fails; v2 waits behind it, so registry numbers keep our order.
        rows = wait_for(
            lambda: [r for r in outbox_rows(conninfo, series_id) if r[1] >= 1], "a failed try"
        )
        assert rows[0][0] == 1 and rows[0][2]
        assert [r[0] for r in outbox_rows(conninfo, series_id)] == [1, 2]
    finally:
        stop(proc)

    # A drainer that died after logging v1's run but before recording it in PostgreSQL.
    logger = MlflowLogger(mlflow_store["MLFLOW_TRACKING_URI"], EXPERIMENT)
    orphan_run_id, _ = logger.log_fit(fit_record(conninfo, series_id, 1))
    with psycopg.connect(conninfo, autocommit=True) as conn:  # skip the back-off
        conn.execute("UPDATE mlflow_outbox SET next_try = now()")

    proc, base_url = start_api(tracking_settings, **mlflow_store)
    try:
        ids = wait_for(lambda: logged_run_ids(base_url, series_id), "the backlog to drain")
    finally:
        stop(proc)

    assert ids[0] == orphan_run_id
    client = MlflowClient(tracking_uri=mlflow_store["MLFLOW_TRACKING_URI"])
    runs = runs_of(client, series_id)
    assert [r.info.run_id for r in runs] == ids
    assert len({r.data.tags[FIT_KEY_TAG] for r in runs}) == 2
    versions = client.search_model_versions(f"name = '{registered_model_name(series_id)}'")
    assert sorted((int(v.version), v.run_id) for v in versions) == [(1, ids[0]), (2, ids[1])]
    assert outbox_rows(conninfo, series_id) == []


def test_names_and_locations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert registered_model_name("plant:a.b") == "anomaly-plant%3Aa.b"
    assert local_artifact_location("http://mlflow:5000") is None
    monkeypatch.delenv("MLFLOW_ARTIFACTS_DESTINATION", raising=False)
    db = tmp_path / "m.db"
    assert local_artifact_location(f"sqlite:///{db}") == (tmp_path / "mlartifacts").as_uri()
    assert retry_delay(1) == 2.0
    assert retry_delay(100) == 300.0


def test_feedback_is_recorded_on_its_versions_run(
    tracking_settings: Settings, mlflow_store: dict[str, str], series_id: str
) -> None:
    """Feedback waits in PostgreSQL until its version's run exists, then lands on it once."""
    proc, base_url = start_api(tracking_settings, **mlflow_store)
    try:
        fit(base_url, series_id, [1.0, 2.0, 4.0, 9.0])
        missed = {"label": "missed", "from": 1, "to": 3, "note": "an outage"}
        r = httpx.post(f"{base_url}/series/{series_id}/feedback", json=missed, timeout=10)
        assert r.status_code == 200, r.text
        feedback_id = r.json()["id"]

        def logged() -> bool | None:
            listed = httpx.get(f"{base_url}/series/{series_id}/feedback", timeout=10).json()
            return True if listed["feedback"][0]["mlflow_logged"] else None

        wait_for(logged, "the feedback on the run")
        (run_id,) = run_ids(base_url, series_id)
    finally:
        stop(proc)
    client = MlflowClient(tracking_uri=mlflow_store["MLFLOW_TRACKING_URI"])
    run = client.get_run(str(run_id))
    recorded = run.data.tags[f"feedback.{feedback_id}"]
    assert '"label": "missed"' in recorded and '"note": "an outage"' in recorded
    assert run.data.metrics["feedback_missed"] == 1.0


def test_a_bulk_fit_job_is_one_run_listing_its_versions(
    tracking_settings: Settings, mlflow_store: dict[str, str], tmp_path: Path
) -> None:
    """A bulk fit job is one MLflow run (its options, counts and a table of its versions),
    not a run a version; each version reports the job's run. A job whose process stopped
    mid-way is logged too, as killed."""
    conninfo = tracking_settings.postgres_conninfo()
    with psycopg.connect(conninfo, autocommit=True) as conn:
        row = conn.execute(
            "INSERT INTO fit_jobs (source, kind, sigma, direction, updated_at)"
            " VALUES ('cli', 'static', 3, 'above', now() - interval '1 hour') RETURNING id"
        ).fetchone()
    assert row is not None
    stalled = int(row[0])
    name = f"bulk-{uuid.uuid4().hex[:8]}"
    series: list[dict[str, Any]] = [
        {"series_id": f"{name}-{i}", "timestamps": [1, 2, 3, 4], "values": [1.0, 2.0, 4.0, 9.0 + i]}
        for i in range(5)
    ]
    series.append({"series_id": f"{name}-flat", "timestamps": [1, 2, 3], "values": [1.0] * 3})
    proc, base_url = start_api(tracking_settings, **mlflow_store)
    try:
        r = httpx.post(
            f"{base_url}/fit", json={"series": series, "sigma": 2.5, "kind": "static"}, timeout=30
        )
        assert r.status_code == 200, r.text
        job = r.json()["job"]
        (run_id,) = wait_for(lambda: logged_run_ids(base_url, f"{name}-0"), "the job's run")
        for i in range(5):
            assert run_ids(base_url, f"{name}-{i}") == [run_id]

        def stalled_run() -> str | None:
            with psycopg.connect(conninfo, autocommit=True) as conn:
                found = conn.execute(
                    "SELECT mlflow_run_id FROM fit_jobs WHERE id = %s", (stalled,)
                ).fetchone()
            return found[0] if found else None

        stalled_run_id = wait_for(stalled_run, "the stalled job's run")
    finally:
        stop(proc)

    client = MlflowClient(tracking_uri=mlflow_store["MLFLOW_TRACKING_URI"])
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == f"bulk-fit-{job}"
    assert run.data.params == {
        "job": str(job),
        "source": "rest",
        "kind": "static",
        "sigma": "2.5",
        "direction": "above",
        "count": "6",
    }
    assert run.data.metrics["series_fitted"] == 5.0
    assert run.data.metrics["series_refused"] == 1.0
    assert run.data.metrics["points"] == 20.0
    assert run.data.metrics["seconds"] > 0
    table = Path(client.download_artifacts(run_id, "fits.csv", str(tmp_path)))
    lines = table.read_text().splitlines()
    assert lines[0] == "series_id,version,mean,std,sigma,points"
    assert [line.split(",")[:2] for line in lines[1:]] == [[f"{name}-{i}", "1"] for i in range(5)]
    assert [float(line.split(",")[2]) for line in lines[1:]] == [4.0 + i / 4 for i in range(5)]
    refused = client.download_artifacts(run_id, "refused.json", str(tmp_path))
    assert f"{name}-flat" in Path(refused).read_text()
    # Not registered one by one, and no outbox row a version.
    assert client.search_model_versions(f"name = '{registered_model_name(f'{name}-0')}'") == []
    assert outbox_rows(conninfo, f"{name}-0") == []
    assert client.get_run(stalled_run_id).info.status == "KILLED"
