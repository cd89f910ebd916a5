"""Keys one script touches together share a Redis Cluster slot; the cluster setting's form."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from redis.crc import key_slot

from detector.redis_keys import producer_key, same_slot
from detector.settings import Settings


@pytest.mark.parametrize(
    "stream", ["readings", "readings:{a}", "{a}", "a{b}c", "r{", "readings:dead", "{x}{y}"]
)
def test_a_producer_record_lies_in_its_streams_slot(stream: str) -> None:
    key = producer_key(stream, "p1")
    assert key != stream and key_slot(key.encode()) == key_slot(stream.encode())


def test_a_tagged_name_keeps_its_tag_and_a_plain_one_becomes_one() -> None:
    assert same_slot("readings:{a}") == "readings:{a}"
    assert same_slot("readings") == "{readings}"
    assert same_slot("x{}y") == "x{}y"  # an empty tag is none, and braces cannot wrap it


def test_cluster_seed_nodes() -> None:
    assert Settings(redis_cluster_nodes="").redis_cluster_seeds() == []
    seeds = Settings(redis_cluster_nodes=" a:7000, 10.0.0.2:7001 ,[::1]:7002")
    assert seeds.redis_cluster_seeds() == [("a", 7000), ("10.0.0.2", 7001), ("::1", 7002)]
    for wrong in ("a", "a:", ":7000", "a:70000", "a:7000,", "a:x"):
        with pytest.raises(ValidationError, match="REDIS_CLUSTER_NODES"):
            Settings(redis_cluster_nodes=wrong)
