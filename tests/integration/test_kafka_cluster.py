"""The faust worker on a real Redis Cluster (three masters, three replicas) and a real
Kafka-protocol broker: with STREAM_SHARDS its series' keys are split by shard, each batch's
scripts run a shard at a time in one slot, and the events are those one Redis gives."""

from __future__ import annotations

from collections import Counter

import httpx
import pytest
import redis

from detector.redis_keys import silence_key, state_key
from detector.settings import Settings
from detector.shards import kafka_shards, shard_of
from embedded.servers import RedisClusterServers
from tests.integration.test_cluster import master_of
from tests.integration.test_kafka import publish
from tests.support.kafka import KafkaNames, KafkaWorker, create_topics, group_caught_up, read_topic
from tests.support.polling import wait_for
from tests.support.streams import fit, fit_seasonal

pytestmark = pytest.mark.slow

SHARDS = 6
TRAINING = [90.0, 110.0] * 5  # μ 100, σ 10: 100 is never anomalous, 500 always is


def test_kafka_worker_on_a_cluster_splits_each_batch_by_shard(
    cluster_settings: Settings,
    cluster_client: httpx.Client,
    rc: redis.Redis,
    redis_cluster: RedisClusterServers,
    kafka_bootstrap: str,
    series_id: str,
) -> None:
    names = KafkaNames.fresh()
    create_topics(kafka_bootstrap, names)
    s = cluster_settings.model_copy(
        update={
            "stream_shards": SHARDS,
            "kafka_readings_topic": names.readings,
            "kafka_anomalies_topic": names.anomalies,
            "kafka_dead_topic": names.dead,
        }
    )
    homes = kafka_shards(s)
    assert len(homes) == SHARDS
    # The shards' keys lie on every master.
    assert len({master_of(redis_cluster, h.anomalies) for h in homes}) == 3
    series = [f"{series_id}-{i}" for i in range(30)]
    for sid in series:
        fit(cluster_client, sid, TRAINING)
    seasonal = f"{series_id}-seasonal"
    later = fit_seasonal(cluster_client, seasonal)
    # An outage across the fleet: every series' third reading is anomalous, one incident.
    start = 2_100_000_000
    rows = [(sid, start + n, 100.0) for n in range(2) for sid in series]
    rows += [(sid, start + 2, 500.0) for sid in series]
    rows += [(seasonal, t, v) for t, v in later]
    ids = publish(kafka_bootstrap, names.readings, rows)

    worker = KafkaWorker(
        s,
        kafka_bootstrap,
        names,
        STREAM_SHARDS=str(SHARDS),
        KAFKA_BATCH_COUNT="40",  # batches that mix the shards
        INCIDENT_MIN_SERIES="3",
        INCIDENT_WINDOW_SECONDS="5",
        INCIDENT_SWEEP_SECONDS="0.2",
    )

    def events() -> list[dict[str, str]]:
        return [value for _, _, _, value in read_topic(kafka_bootstrap, names.anomalies)]

    try:
        wait_for(lambda: worker.scored() == len(rows), "every reading scored", 60)
        wait_for(lambda: group_caught_up(kafka_bootstrap, names.app_id, names.readings), "commit")
        wait_for(
            lambda: [e for e in events() if e.get("type") == "incident" and e["state"] == "closed"],
            "the incident closed",
            60,
        )
    finally:
        worker.stop()

    got = events()
    anomalies = [e for e in got if e.get("type", "anomaly") == "anomaly"]
    static = [e for e in anomalies if e["series_id"] != seasonal]
    assert Counter(e["source_id"] for e in static) == Counter(
        ids[n] for n, (_, _, v) in enumerate(rows) if v == 500.0
    )
    assert all(e.get("episode_id") and e["onset"] == "1" for e in static)
    incidents = [e for e in got if e.get("type") == "incident"]
    assert [e["state"] for e in incidents] == ["open", "closed"]
    assert int(incidents[1]["series_count"]) == 30
    # The seasonal series' state is in its shard's slot, never under the unsharded name.
    home = homes[shard_of(seasonal, SHARDS)]
    assert rc.exists(state_key(seasonal, home.namespace))
    assert not rc.exists(state_key(seasonal))
    # The silence watch of each shard saw that shard's series, and only those.
    for index, shard in enumerate(homes):
        watched = set(rc.hkeys(silence_key(shard.anomalies, "series")))
        assert watched == {x for x in [*series, seasonal] if shard_of(x, SHARDS) == index}
