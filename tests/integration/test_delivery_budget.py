"""What spends a reading's delivery budget: only the reading itself failing, never its worker
dying with it in hand, nor an outage (see docs/stream-contract.md, "Dead letters")."""

from __future__ import annotations

from detector.redis_keys import attempts_key
from tests.support.streams import events, fit, publish, run_worker, stream_settings

START = 1_700_000_000
TRAINING = [90.0, 110.0] * 5  # μ 100, σ 10: the bound is 130


def deliver(redis_client, s, consumer: str, times: int) -> list[str]:
    """Deliver every entry ``times`` times to ``consumer`` (as workers that died with them)."""
    redis_client.xgroup_create(s.stream_readings, s.stream_group, id="0", mkstream=True)
    first = redis_client.xreadgroup(s.stream_group, consumer, {s.stream_readings: ">"})
    ids = [entry_id for entry_id, _ in first[0][1]]
    for _ in range(times - 1):
        redis_client.xreadgroup(s.stream_group, consumer, {s.stream_readings: "0"})
    return ids


def test_valid_readings_past_the_delivery_limit_are_scored_not_dead_lettered(
    settings, client, redis_client, series_id
):
    s = stream_settings(settings)
    fit(client, series_id, TRAINING)
    publish(redis_client, s.stream_readings, [(series_id, START + i, v) for i, v in
                                              enumerate([100.0, 150.0, 101.0])])  # fmt: skip
    ids = deliver(redis_client, s, "w", s.stream_max_deliveries + 2)
    counts = {row["message_id"]: row["times_delivered"] for row in redis_client.xpending_range(
        s.stream_readings, s.stream_group, "-", "+", 10)}  # fmt: skip
    assert all(n > s.stream_max_deliveries for n in counts.values())

    run_worker(s, consumer="w")  # re-reads its pending entries: each one a suspect

    assert redis_client.xrange(s.stream_dead) == []
    assert [f["source_id"] for _, f in events(redis_client, s.stream_anomalies)] == [ids[1]]
    assert redis_client.xpending(s.stream_readings, s.stream_group)["pending"] == 0
    assert redis_client.hlen(attempts_key(s.stream_readings)) == 0  # nothing left counted


def test_a_reading_that_never_finished_alone_twice_is_dead_lettered_the_rest_scored(
    settings, client, redis_client, series_id
):
    s = stream_settings(settings)
    fit(client, series_id, TRAINING)
    publish(redis_client, s.stream_readings, [(series_id, START + i, v) for i, v in
                                              enumerate([150.0, 160.0, 170.0])])  # fmt: skip
    ids = deliver(redis_client, s, "w", s.stream_max_deliveries + 2)
    # The middle one was taken in hand alone twice, and its worker never finished it.
    redis_client.hset(attempts_key(s.stream_readings), ids[1], 2)

    run_worker(s, consumer="w")

    dead = [f for _, f in redis_client.xrange(s.stream_dead)]
    assert [(d["source_id"], d["reason"]) for d in dead] == [(ids[1], "too_many_deliveries")]
    assert dead[0]["series_id"] == series_id and dead[0]["value"] == "160.0"
    sources = sorted(f["source_id"] for _, f in events(redis_client, s.stream_anomalies))
    assert sources == sorted([ids[0], ids[2]])
    assert redis_client.xpending(s.stream_readings, s.stream_group)["pending"] == 0
