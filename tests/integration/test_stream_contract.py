"""The stream contract, on both transports (Redis Streams and Kafka), each on one Redis and on
a Redis Cluster of three masters and three replicas (sharded streams), through real workers:
fields, episodes, a stateful kind, poison entries, a refit mid-stream, kill -9, incidents."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from detector.kinds.registry import STATEFUL
from detector.settings import Settings
from detector.wire.events import EVENT_FIELDS
from tests.support.polling import wait_for
from tests.support.transports import (
    ClusterTransport,
    KafkaClusterTransport,
    KafkaTransport,
    RedisTransport,
    Transport,
)

pytestmark = pytest.mark.slow

START = 1_700_000_000


@pytest.fixture(params=["redis", "kafka", "cluster", "kafka-cluster"])
def transport(request: pytest.FixtureRequest, settings: Settings) -> Iterator[Transport]:
    """Each transport on one Redis, then on the Redis Cluster (sharded streams)."""
    env = {"MODEL_REFRESH_SECONDS": "1"}
    chosen: Transport
    if request.param == "redis":
        chosen = RedisTransport(settings, **env)
    elif request.param == "cluster":
        chosen = ClusterTransport(request.getfixturevalue("cluster_settings"), **env)
    elif request.param == "kafka":
        chosen = KafkaTransport(settings, request.getfixturevalue("kafka_bootstrap"), **env)
    else:
        chosen = KafkaClusterTransport(
            request.getfixturevalue("cluster_settings"),
            request.getfixturevalue("kafka_bootstrap"),
            **env,
        )
    yield chosen
    chosen.stop_worker()


@pytest.fixture
def api(request: pytest.FixtureRequest, transport: Transport) -> httpx.Client:
    """The service on the transport's Redis (one Redis, or the cluster)."""
    return request.getfixturevalue("cluster_client" if transport.on_cluster else "client")


def fresh(prefix: str = "c") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def fit(client, series_id: str, **options) -> str:
    """μ = 100, σ = 10 (the bound μ + 3σ is 130), on the hour before the stream."""
    body = {
        "timestamps": list(range(START - 10, START)),
        "values": [90.0, 110.0] * 5,
        **options,
    }
    answer = client.post(f"/fit/{series_id}", json=body)
    assert answer.status_code == 200, answer.text
    return str(answer.json()["version"])


def run_to_end(transport: Transport) -> None:
    transport.start_worker()
    wait_for(transport.drained, f"the {transport.name} worker to commit everything")


def test_events_carry_the_contract_fields_and_one_episode_per_burst(api, transport):
    series_id = fresh()
    fit(api, series_id, kind="static")
    values = [100.0] * 20 + [150.0, 151.0, 152.0] + [100.0] * 20
    rows = [(series_id, START + i, v) for i, v in enumerate(values)]
    transport.publish(rows)
    run_to_end(transport)

    found = transport.events()
    assert [int(e["timestamp"]) for e in found] == [START + 20, START + 21, START + 22]
    for event, value in zip(found, (150.0, 151.0, 152.0), strict=True):
        assert list(event)[: len(EVENT_FIELDS)] == list(EVENT_FIELDS)
        assert event["series_id"] == series_id and event["model_version"] == "v1.0.0"
        assert float(event["value"]) == value
        assert float(event["mean"]) == 100.0 and float(event["std"]) == 10.0
        assert float(event["lower"]) == 70.0 and float(event["upper"]) == 130.0
        assert float(event["score"]) == pytest.approx((value - 100.0) / 10.0)
        assert event["kind"] == "static" and event["test"] == "threshold"
        # The explanation: expected value, and severity 0–100 (50 at the bound).
        assert float(event["expected"]) == 100.0
        ratio = abs(value - 100.0) / 30.0
        assert float(event["severity"]) == pytest.approx(100 * ratio / (1 + ratio), abs=0.05)
    # One burst, one episode: the first reading opens it, the others join.
    assert len({e["episode_id"] for e in found}) == 1
    assert [e["onset"] for e in found] == ["1", "0", "0"]
    assert found[0]["episode_id"] == found[0]["source_id"]


@pytest.mark.parametrize("kind", sorted(STATEFUL))
def test_a_stateful_kind_flags_a_level_shift_with_its_own_episodes(api, transport, kind):
    series_id = fresh("ms")
    rng = np.random.default_rng(3)
    step = 300
    fit_points = 600
    training = [round(float(x), 6) for x in 100.0 + rng.normal(0.0, 1.0, fit_points)]
    answer = api.post(
        f"/fit/{series_id}",
        json={
            "timestamps": [START + step * i for i in range(fit_points)],
            "values": training,
            "kind": kind,
        },
    )
    assert answer.status_code == 200, answer.text
    stream = [round(float(x), 6) for x in 100.0 + rng.normal(0.0, 1.0, 200)]
    stream[100:] = [v + 25.0 for v in stream[100:]]
    first = START + step * fit_points
    transport.publish([(series_id, first + step * i, v) for i, v in enumerate(stream)])
    run_to_end(transport)

    found = transport.events()
    assert found, "a 25σ level shift raised no event"
    assert all(e["kind"] == kind for e in found)
    for e in found:  # every event explained: expected value, bounds, severity, test
        assert float(e["lower"]) <= float(e["expected"]) <= float(e["upper"])
        assert not float(e["lower"]) <= float(e["value"]) <= float(e["upper"]) or (
            e["test"] != "point"
        )
        assert 50.0 < float(e["severity"]) <= 100.0
        assert e["test"] in ("point", "shift", "divergence")
    assert all(int(e["timestamp"]) >= first + step * 100 for e in found)
    onsets = [e for e in found if e["onset"] == "1"]
    assert len(onsets) == 1  # one alert for one excursion
    assert onsets[0]["test"] in ("point", "shift", "divergence")
    assert {e["episode_id"] for e in found} == {onsets[0]["source_id"]}


def test_poison_entries_become_dead_letters_and_the_stream_goes_on(api, transport):
    series_id = fresh()
    fit(api, series_id)
    poison = [
        ({"series_id": series_id, "timestamp": "1.5", "value": "1"}, "bad_timestamp"),
        ({"series_id": series_id, "timestamp": str(START), "value": "nan"}, "bad_value"),
        ({"series_id": "bad id!", "timestamp": str(START), "value": "1"}, "bad_series_id"),
        ({"series_id": series_id, "timestamp": str(START)}, "missing_field"),
        (
            {"series_id": series_id, "timestamp": str(START), "value": "1", "version": "v9"},
            "unknown_version",
        ),
        (
            {"series_id": series_id, "timestamp": str(START), "value": "1", "version": "x"},
            "bad_version",
        ),
    ]
    for fields, _ in poison:
        transport.publish_fields(fields)
    transport.publish([(series_id, START + 1, 200.0)])
    run_to_end(transport)

    assert sorted(d["reason"] for d in transport.dead()) == sorted(r for _, r in poison)
    assert [float(e["value"]) for e in transport.events()] == [200.0]


def test_a_refit_mid_stream_is_used_by_the_running_worker(api, transport):
    series_id = fresh()
    fit(api, series_id)
    transport.publish([(series_id, START + 1, 140.0)])  # anomalous for v1 (bound 130)
    run_to_end(transport)
    assert [e["model_version"] for e in transport.events()] == ["v1.0.0"]

    answer = api.post(
        f"/fit/{series_id}",
        json={"timestamps": list(range(START - 10, START)), "values": [140.0, 160.0] * 5},
    )
    assert answer.json()["version"] == "v2.0.0"
    time.sleep(1.5)  # MODEL_REFRESH_SECONDS=1: the worker re-reads the latest pointer
    transport.publish([(series_id, START + 2, 140.0), (series_id, START + 3, 200.0)])
    wait_for(lambda: len(transport.events()) == 2 and transport.drained(), "the second event")
    second = transport.events()[1]
    assert second["model_version"] == "v2.0.0" and float(second["value"]) == 200.0


def test_kill_9_mid_stream_loses_nothing(api, transport):
    series = [fresh() for _ in range(4)]
    for series_id in series:
        fit(api, series_id)
    rng = np.random.default_rng(7)
    rows, anomalous = [], []
    for n in range(20_000):
        anomaly = rng.random() < 0.01
        value = 150.0 + float(rng.uniform(0, 10)) if anomaly else float(rng.uniform(80, 120))
        rows.append((series[n % 4], START + n, round(value, 6)))
        if anomaly:
            anomalous.append((series[n % 4], START + n))
    transport.publish(rows)
    transport.start_worker()
    time.sleep(1.0)  # mid-stream (the deadline is generous; the count below is what matters)
    transport.kill_worker()
    run_to_end(transport)

    found = Counter((e["series_id"], int(e["timestamp"])) for e in transport.events())
    assert set(found) == set(anomalous)  # nothing lost
    by_source = Counter(e["source_id"] for e in transport.events())
    if transport.exactly_once:
        assert max(by_source.values()) == 1  # exactly once: the commit script skips repeats
    else:
        # At-least-once: a repeat carries the same source_id, so consumers can drop it.
        assert len(by_source) == len(anomalous)
    assert transport.dead() == []


def test_an_outage_across_many_series_is_one_incident_event_each_way(api, transport, pg):
    """Incidents on every transport: one open and one closed `incident` event on the output
    for an outage across 40 series, and one PostgreSQL row under the output's name (on a
    cluster, the first shard's)."""
    window = 10  # arrival time too: the 40 onsets reach the worker well within it
    transport.env.update(  # type: ignore[attr-defined]
        INCIDENT_MIN_SERIES="3",
        INCIDENT_WINDOW_SECONDS=str(window),
        INCIDENT_SWEEP_SECONDS="0.2",
    )
    series = [fresh("inc") for _ in range(40)]
    for sid in series:
        fit(api, sid, kind="static")
    at = START + 50_000 + int(uuid.uuid4().int % 10**6) * 10
    transport.publish([(sid, at + i % 2, 500.0) for i, sid in enumerate(series)])
    transport.start_worker()

    def incidents() -> list[dict[str, str]]:
        return [e for e in transport.events() if e.get("type") == "incident"]

    wait_for(lambda: len(incidents()) >= 2, f"the incident to close on {transport.name}", 90)
    time.sleep(1.0)  # more sweeps: still one of each
    found = incidents()
    assert [e["state"] for e in found] == ["open", "closed"]
    opened, closed = found
    assert opened["incident_id"] == closed["incident_id"]
    assert int(closed["series_count"]) == 40 and closed["closed_by"] == "idle"
    assert (int(closed["first_onset"]), int(closed["last_onset"])) == (at, at + 1)
    assert len([e for e in transport.events() if e.get("type", "anomaly") == "anomaly"]) == 40
    rows = pg.execute(
        "SELECT source, state, series_count FROM incidents WHERE incident_id = %s",
        (opened["incident_id"],),
    ).fetchall()
    assert rows == [(transport.incident_source(), "closed", 40)]
