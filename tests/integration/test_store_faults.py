"""Faults of the model store: Redis stalling mid-fit, a PostgreSQL commit that fails or is
slow, PostgreSQL restarted under an idle API. Each fault hits servers of this module's own.

The rule checked throughout: a version is visible anywhere (Redis, an API's caches, an answer)
only once PostgreSQL has committed it, and a version number is never handed out twice.
"""

from __future__ import annotations

import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest
import redis

from detector.settings import Settings
from detector.store.connections import apply_schema_sync
from embedded.processes import free_port
from embedded.servers import PostgresServer, RedisServer
from tests.support.services import postgres_data_dir, start_api

LOW = [90.0, 110.0] * 5  # μ 100, σ 10: 500 is anomalous
HIGH = [990.0, 1010.0] * 5  # μ 1000, σ 10: 500 is not

# A deferred constraint trigger runs at COMMIT: it sleeps, then fails, for the series listed
# in `commit_faults`, so a test can hold a fit's commit open or make it fail.
COMMIT_FAULT_SQL = """
CREATE TABLE IF NOT EXISTS commit_faults (
    series_id text PRIMARY KEY, sleep_seconds double precision NOT NULL, fail boolean NOT NULL
);
CREATE OR REPLACE FUNCTION commit_fault() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    fault record;
BEGIN
    SELECT * INTO fault FROM commit_faults WHERE series_id = NEW.series_id;
    IF FOUND THEN
        PERFORM pg_sleep(fault.sleep_seconds);
        IF fault.fail THEN
            RAISE EXCEPTION 'injected commit failure for %', NEW.series_id;
        END IF;
    END IF;
    RETURN NULL;
END
$$;
DROP TRIGGER IF EXISTS commit_fault ON model_versions;
CREATE CONSTRAINT TRIGGER commit_fault AFTER INSERT ON model_versions
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION commit_fault();
"""


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("store-redis"), free_port(), appendonly=True)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def own_postgres() -> Iterator[PostgresServer]:
    data_dir = postgres_data_dir()
    server = PostgresServer(data_dir, free_port(), durable=False)
    server.start()
    apply_schema_sync(server.conninfo())
    with psycopg.connect(server.conninfo(), autocommit=True) as conn:
        conn.execute(COMMIT_FAULT_SQL)
    yield server
    server.stop()
    shutil.rmtree(data_dir.parent, ignore_errors=True)


@pytest.fixture(scope="module")
def own_settings(own_redis: RedisServer, own_postgres: PostgresServer) -> Settings:
    return Settings(**own_redis.settings_fields(), **own_postgres.settings_fields())


@pytest.fixture(scope="module")
def two_apis(own_settings: Settings) -> Iterator[tuple[str, str]]:
    """Two API processes on the same servers, each with its own in-process caches."""
    first, first_url = start_api(own_settings)
    second, second_url = start_api(own_settings)
    yield first_url, second_url
    for proc in (first, second):
        proc.terminate()
        proc.wait(30)


@pytest.fixture
def rclient(own_redis: RedisServer) -> Iterator[redis.Redis]:
    # The admin user: these tests DEBUG SLEEP, which the services may not.
    client = redis.Redis.from_url(own_redis.admin_url(), decode_responses=True, socket_timeout=60)
    yield client
    client.close()


@pytest.fixture
def sid() -> str:
    return f"sf-{uuid.uuid4().hex[:10]}"


def body(values: list[float]) -> dict[str, Any]:
    return {"timestamps": list(range(len(values))), "values": values}


def predict(url: str, series_id: str, value: float = 500.0, **params: str) -> httpx.Response:
    return httpx.post(
        f"{url}/predict/{series_id}", params=params, json={"timestamp": 1, "value": value}
    )


def listed_versions(url: str, series_id: str) -> list[str]:
    answer = httpx.get(f"{url}/models/{series_id}")
    assert answer.status_code == 200, answer.text
    return [v["version"] for v in answer.json()["versions"]]


def committed(s: Settings, series_id: str) -> set[int]:
    with psycopg.connect(s.postgres_conninfo(), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT version FROM model_versions WHERE series_id = %s", (series_id,)
        ).fetchall()
    return {int(r[0]) for r in rows}


def set_commit_fault(s: Settings, series_id: str, sleep: float, *, fail: bool) -> None:
    with psycopg.connect(s.postgres_conninfo(), autocommit=True) as conn:
        conn.execute(
            "INSERT INTO commit_faults VALUES (%s, %s, %s) ON CONFLICT (series_id)"
            " DO UPDATE SET sleep_seconds = excluded.sleep_seconds, fail = excluded.fail",
            (series_id, sleep, fail),
        )


def clear_commit_fault(s: Settings, series_id: str) -> None:
    with psycopg.connect(s.postgres_conninfo(), autocommit=True) as conn:
        conn.execute("DELETE FROM commit_faults WHERE series_id = %s", (series_id,))


def assert_redis_only_has_committed(rclient: redis.Redis, s: Settings, series_id: str) -> None:
    hot: dict[str, str] = rclient.hgetall(f"model:{{{series_id}}}")  # type: ignore[assignment]
    durable = committed(s, series_id)
    fields = {int(k) for k in hot if k != "latest"}
    assert fields <= durable, f"Redis has {sorted(fields - durable)}, never committed"
    if "latest" in hot:
        assert int(hot["latest"]) in durable, f"latest {hot['latest']} was never committed"


class Background(threading.Thread):
    def __init__(self, target: Any, *args: Any) -> None:
        super().__init__(daemon=True)
        self.fn, self.args = target, args
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.fn(*self.args)
        except BaseException as exc:
            self.error = exc

    def value(self, timeout: float = 120) -> Any:
        self.join(timeout)
        assert not self.is_alive(), "the background call did not finish"
        if self.error is not None:
            raise self.error
        return self.result


def fit_via(url: str, series_id: str, values: list[float]) -> httpx.Response:
    return httpx.post(f"{url}/fit/{series_id}", json=body(values), timeout=120)


# ---------------------------------------------------------------- Redis stalls mid-fit


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_redis_stall_during_fits_leaves_no_phantom_version(
    two_apis: tuple[str, str], own_settings: Settings, own_redis: RedisServer, sid: str
) -> None:
    url, other = two_apis
    assert fit_via(url, sid, LOW).status_code == 200
    sleeper_client = redis.Redis.from_url(own_redis.admin_url(), socket_timeout=90)
    sleeper = Background(sleeper_client.execute_command, "DEBUG", "SLEEP", "35")
    sleeper.start()
    time.sleep(0.3)  # the server is asleep: every fit below meets a stalled Redis
    fits = [Background(fit_via, url, sid, HIGH) for _ in range(3)]
    for thread in fits:
        thread.start()
    sleeper.value()
    sleeper_client.close()
    answers = [thread.value(180) for thread in fits]
    statuses = [a.status_code for a in answers]
    assert set(statuses) <= {200, 503}, statuses
    with redis.Redis.from_url(own_redis.admin_url(), decode_responses=True) as rclient:
        assert_redis_only_has_committed(rclient, own_settings, sid)
    for base in (url, other):
        answer = predict(base, sid)
        assert answer.status_code == 200, answer.text
        version = answer.json()["model_version"]
        assert version in listed_versions(base, sid), (version, statuses)
        plot = httpx.get(f"{base}/plot", params={"series_id": sid, "version": version})
        assert plot.status_code == 200, plot.text
    # Every fit answered 200 is durable and listed; the newest committed one is the latest.
    listed = listed_versions(url, sid)
    assert {a.json()["version"] for a in answers if a.status_code == 200} <= set(listed)
    assert predict(url, sid).json()["model_version"] == listed[-1]


# ---------------------------------------------------------------- the PostgreSQL commit


def test_no_version_is_visible_before_its_commit(
    two_apis: tuple[str, str], own_settings: Settings, rclient: redis.Redis, sid: str
) -> None:
    url, other = two_apis
    assert fit_via(url, sid, LOW).json()["version"] == "v1.0.0"
    assert predict(other, sid).json() == {"anomaly": True, "model_version": "v1.0.0"}
    set_commit_fault(own_settings, sid, 3.0, fail=False)
    try:
        slow = Background(fit_via, url, sid, HIGH)
        slow.start()
        seen_redis: list[dict[str, str]] = []
        seen_answers: list[Any] = []
        while slow.is_alive():
            seen_redis.append(rclient.hgetall(f"model:{{{sid}}}"))  # type: ignore[arg-type]
            seen_answers.append(predict(other, sid).json())
            time.sleep(0.05)
        answer = slow.value()
    finally:
        clear_commit_fault(own_settings, sid)
    assert answer.status_code == 200 and answer.json()["version"] == "v2.0.0", answer.text
    # The last reads may come after the commit; nothing before it may show v2.
    early = seen_redis[:-3]
    assert len(early) >= 5
    assert [s for s in early if "2" in s or s.get("latest") != "1"] == [], early
    assert all(a == {"anomaly": True, "model_version": "v1.0.0"} for a in seen_answers[:-3])
    assert predict(other, sid).json() == {"anomaly": False, "model_version": "v2.0.0"}


def test_failed_commit_leaves_a_gap_and_every_process_agrees(
    two_apis: tuple[str, str], own_settings: Settings, rclient: redis.Redis, sid: str
) -> None:
    url, other = two_apis
    assert fit_via(url, sid, LOW).json()["version"] == "v1.0.0"
    set_commit_fault(own_settings, sid, 1.5, fail=True)
    try:
        doomed = Background(fit_via, url, sid, HIGH)
        doomed.start()
        while doomed.is_alive():  # both processes read while the commit is in doubt
            for base in (url, other):
                predict(base, sid)
                predict(base, sid, version="2")
            time.sleep(0.05)
        failed = doomed.value()
    finally:
        clear_commit_fault(own_settings, sid)
    assert failed.status_code == 503, failed.text
    assert "not stored" in failed.json()["detail"]
    assert_redis_only_has_committed(rclient, own_settings, sid)
    refit = fit_via(url, sid, LOW)
    assert refit.status_code == 200, refit.text
    assert refit.json()["version"] == "v3.0.0", "a rolled-back version number was reused"
    answers = [predict(base, sid).json() for base in (url, other)]
    assert answers == [{"anomaly": True, "model_version": "v3.0.0"}] * 2
    for base in (url, other):
        assert predict(base, sid, version="2").status_code == 404
        assert listed_versions(base, sid) == ["v1.0.0", "v3.0.0"]
    models = httpx.get(f"{url}/models", params={"after": sid[:-1], "limit": 1000}).json()
    (item,) = [i for i in models["items"] if i["series_id"] == sid]
    assert item["latest_version"] == "v3.0.0"


def test_a_bulk_fit_refuses_only_the_series_whose_commit_fails(
    two_apis: tuple[str, str], own_settings: Settings, rclient: redis.Redis, sid: str
) -> None:
    """A batch whose commit PostgreSQL refuses is stored again in halves: the series that
    fails alone is refused with its single fit's answer, every other one is stored."""
    url, other = two_apis
    ids = [f"{sid}-{i}" for i in range(9)]
    bad = ids[5]
    set_commit_fault(own_settings, bad, 0.0, fail=True)
    try:
        answer = httpx.post(
            f"{url}/fit", json={"series": [{"series_id": s, **body(LOW)} for s in ids]}, timeout=120
        )
        single = fit_via(url, bad, LOW)
    finally:
        clear_commit_fault(own_settings, bad)
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert [f["series_id"] for f in result["fitted"]] == [s for s in ids if s != bad]
    assert single.status_code == 503
    assert result["refused"] == [
        {"series_id": bad, "status": 503, "detail": single.json()["detail"]}
    ]
    assert single.json()["detail"].startswith("PostgreSQL refused the fit, it was not stored")
    assert committed(own_settings, bad) == set()
    for series_id in ids:
        assert_redis_only_has_committed(rclient, own_settings, series_id)
    for base in (url, other):
        assert predict(base, ids[0]).json() == {"anomaly": True, "model_version": "v1.0.0"}
        assert predict(base, bad).status_code == 404


# ---------------------------------------------------------------- PostgreSQL restarted


def test_first_request_after_a_postgres_restart_is_served(
    own_settings: Settings, own_postgres: PostgresServer, sid: str
) -> None:
    proc, url = start_api(own_settings)
    try:
        assert fit_via(url, sid, LOW).status_code == 200
        assert httpx.get(f"{url}/models/{sid}").status_code == 200
        own_postgres.stop()
        own_postgres.start()  # returns once it accepts connections
        answer = httpx.get(f"{url}/models/{sid}", timeout=30)
        assert answer.status_code == 200, answer.text
    finally:
        proc.terminate()
        proc.wait(30)
