"""Sharded streams' naming: a series' shard is fixed, and every key a shard's batch scripts
touch lies in the shard's slot."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError
from redis.crc import key_slot

from detector.identifiers import SERIES_ID_SCHEMA
from detector.redis_keys import episode_key, held_key, incident_key, silence_key, state_key
from detector.settings import Settings
from detector.shards import series_shard, shard_of, shards

series_ids = st.from_regex(str(SERIES_ID_SCHEMA["pattern"]), fullmatch=True)


def test_the_shard_of_a_series_never_changes() -> None:
    # CRC-32 (IEEE) of the id: the same in every process, release and language, so a
    # producer in any language can route (CRC-32 of "a" is 0xE8B7BE43, 3 mod 8).
    assert [shard_of(s, 8) for s in ("cpu", "disk-1", "a")] == [6, 5, 3]
    assert shard_of("anything", 1) == 0


@given(series_ids, st.integers(1, 1024))
def test_every_series_has_one_shard_in_range(series_id: str, count: int) -> None:
    assert 0 <= shard_of(series_id, count) < count


@given(series_ids, st.integers(2, 64))
def test_a_shards_streams_and_its_series_keys_share_one_slot(series_id: str, count: int) -> None:
    s = Settings(stream_shards=count)
    home = series_shard(s, series_id)
    keys = [
        home.readings,
        home.anomalies,
        home.dead,
        state_key(series_id, home.namespace),
        episode_key(series_id, home.namespace),
        held_key(home.namespace),
        silence_key(home.anomalies, "deadlines"),
        incident_key(home.anomalies, "current"),
    ]
    assert len({key_slot(k.encode()) for k in keys}) == 1, keys


def test_one_shard_keeps_every_name() -> None:
    (only,) = shards(Settings())
    assert (only.readings, only.anomalies, only.dead, only.namespace) == (
        "readings",
        "anomalies",
        "readings:dead",
        "",
    )
    assert state_key("cpu", only.namespace) == "state:{cpu}"


def test_sharded_names_may_hold_no_brace() -> None:
    with pytest.raises(ValidationError, match="brace"):
        Settings(stream_shards=2, stream_anomalies="anomalies:{a}")
    Settings(stream_shards=1, stream_anomalies="anomalies:{a}")  # unsharded: as before


@pytest.mark.parametrize("count", [2, 3, 6, 12, 48, 64, 96])
def test_the_shards_spread_evenly_over_masters_of_equal_slot_ranges(count: int) -> None:
    # Three masters, each owning a third of the slots (redis-cli --cluster create's split):
    # N / 3 shards each when 3 divides N, else off by a shard a straddled boundary at most.
    masters = [0] * 3
    for sh in shards(Settings(stream_shards=count)):
        masters[key_slot(sh.readings.encode()) * 3 // 16384] += 1
    assert max(masters) - min(masters) <= (0 if count % 3 == 0 else 2), masters
