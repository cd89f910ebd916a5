"""Readings whose bytes are not UTF-8 (in any field name or value) against real workers: each
becomes a `bad_encoding` dead letter and the worker goes on, also on re-reads and claims."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from detector.settings import Settings
from detector.wire.readings import DeadLetter, decode_entry, parse_reading
from tests.support.polling import wait_for
from tests.support.processes import start_worker, stop_process
from tests.support.streams import fit, publish, run_worker, stream_settings

START = 1_700_000_000
TRAINING = [90.0, 110.0] * 5  # μ 100, σ 10: anomalous above 130


@pytest.fixture
def raw_redis(settings: Settings) -> Iterator[redis.Redis]:
    """A client that sends and returns bytes as they are (producers are not all Python)."""
    client = redis.Redis.from_url(settings.redis_connection_url(), decode_responses=False)
    yield client
    client.close()


def xadd(client: redis.Redis, stream: str, *flat: bytes) -> str:
    """XADD with a raw flat field list (names may repeat, bytes may be anything)."""
    return bytes(client.execute_command("XADD", stream, "*", *flat)).decode()


def dead_letters(client: redis.Redis, stream: str) -> dict[str, dict[str, str]]:
    """`readings:dead` by source id (the dead stream itself is always UTF-8)."""
    return {
        fields[b"source_id"].decode(): {k.decode(): v.decode() for k, v in fields.items()}
        for _, fields in client.xrange(stream)  # type: ignore[union-attr]
    }


def fitted_series(client: httpx.Client) -> str:
    series_id = f"bytes-{uuid.uuid4().hex[:10]}"
    fit(client, series_id, TRAINING)
    return series_id


def group_pending(client: redis.Redis, s: Settings) -> int:
    return int(client.xpending(s.stream_readings, s.stream_group)["pending"])  # type: ignore[index]


def test_invalid_utf8_becomes_a_dead_letter_and_the_running_worker_goes_on(
    settings: Settings,
    client: httpx.Client,
    raw_redis: redis.Redis,
    redis_client: redis.Redis,
    tmp_path: Path,
) -> None:
    s = stream_settings(settings)
    series_id = fitted_series(client)
    worker = start_worker(s, "bytes", tmp_path / "worker.log")
    try:
        # The exact entry of `XADD readings * series_id s1 timestamp 1 value "1\xff"`.
        bad_value = xadd(
            raw_redis,
            s.stream_readings,
            b"series_id",
            b"s1",
            b"timestamp",
            b"1",
            b"value",
            b"1\xff",
        )
        bad_name = xadd(
            raw_redis,
            s.stream_readings,
            b"series_id",
            series_id.encode(),
            b"timestamp",
            b"2",
            b"value",
            b"500",
            b"\xfe\xffnote",
            b"x",
        )

        def two_letters() -> dict[str, dict[str, str]] | None:
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
            found = dead_letters(raw_redis, s.stream_dead)
            return found if len(found) == 2 else None

        dead = wait_for(two_letters, "the dead letters", 30)
        good = publish(redis_client, s.stream_readings, [(series_id, START, 500.0)])
        event = wait_for(lambda: raw_redis.xrange(s.stream_anomalies), "the event")
        assert worker.poll() is None, (tmp_path / "worker.log").read_text()
        wait_for(lambda: group_pending(raw_redis, s) == 0, "nothing pending")
    finally:
        stop_process(worker)
    assert dead[bad_value]["reason"] == "bad_encoding"
    # The original fields are kept, invalid bytes escaped as \xNN (backslashreplace).
    assert dead[bad_value]["value"] == "1\\xff"
    assert dead[bad_value]["series_id"] == "s1" and dead[bad_value]["timestamp"] == "1"
    assert dead[bad_name]["reason"] == "bad_encoding"
    assert dead[bad_name]["\\xfe\\xffnote"] == "x"
    assert [e[1][b"source_id"].decode() for e in event] == good
    assert "Traceback" not in (tmp_path / "worker.log").read_text()


def test_invalid_utf8_pending_for_the_restarted_consumer_is_dead_lettered(
    settings: Settings, raw_redis: redis.Redis
) -> None:
    s = stream_settings(settings)
    raw_redis.xgroup_create(s.stream_readings, s.stream_group, id="0", mkstream=True)
    entry = xadd(
        raw_redis, s.stream_readings, b"series_id", b"s1", b"timestamp", b"1", b"value", b"1\xff"
    )
    # Delivered to "again" and never acknowledged: what a worker killed mid-batch leaves.
    raw_redis.xreadgroup(s.stream_group, "again", {s.stream_readings: ">"})
    assert group_pending(raw_redis, s) == 1

    run_worker(s, consumer="again")  # first re-reads its own pending entries (id 0)

    assert dead_letters(raw_redis, s.stream_dead)[entry]["reason"] == "bad_encoding"
    assert group_pending(raw_redis, s) == 0


def test_invalid_utf8_claimed_from_a_dead_consumer_is_dead_lettered(
    settings: Settings, raw_redis: redis.Redis
) -> None:
    s = stream_settings(settings, stream_claim_idle_ms=100, stream_claim_interval_ms=50)
    raw_redis.xgroup_create(s.stream_readings, s.stream_group, id="0", mkstream=True)
    entry = xadd(
        raw_redis, s.stream_readings, b"series_id", b"s1", b"timestamp", b"1", b"\xc3(", b"1"
    )
    raw_redis.xreadgroup(s.stream_group, "gone", {s.stream_readings: ">"})
    time.sleep(0.3)  # idle beyond the claim time

    worker, _ = run_worker(s, consumer="rescuer")  # takes it over with XAUTOCLAIM

    letter = dead_letters(raw_redis, s.stream_dead)[entry]
    assert letter["reason"] == "bad_encoding" and letter["\\xc3("] == "1"
    assert group_pending(raw_redis, s) == 0 and worker.processed == 1


# Field names: the reading's own (so some entries are valid), or any bytes at all.
_NAMES = st.one_of(
    st.sampled_from([b"series_id", b"timestamp", b"value", b"version", b"source_id"]),
    st.binary(max_size=8),
)


def _entries(series_id: str) -> st.SearchStrategy[list[list[bytes]]]:
    """Batches of raw entries: well-formed readings (anomalous or not, of the fitted series or
    of one without a model), the same with some parts swapped for any bytes or extra fields
    added, and field lists of any bytes at all."""
    good = st.tuples(
        st.sampled_from([series_id.encode(), b"no-model"]),
        st.integers(0, 10**10).map(lambda n: str(n).encode()),
        st.sampled_from([b"100", b"500", b"12.5", b"-3e2"]),
    ).map(lambda r: [b"series_id", r[0], b"timestamp", r[1], b"value", r[2]])
    extra = st.lists(st.tuples(_NAMES, st.binary(max_size=6)), max_size=2)
    swaps = st.lists(st.tuples(st.integers(0, 5), st.binary(max_size=6)), max_size=2)

    def corrupt(args: tuple[list[bytes], list[tuple[int, bytes]], list[tuple[bytes, bytes]]]):
        flat, replaced, added = list(args[0]), args[1], args[2]
        for position, part in replaced:
            flat[position] = part
        return flat + [part for pair in added for part in pair]

    anything = st.lists(
        st.tuples(_NAMES, st.one_of(st.binary(max_size=12), st.just(b"1\xff"))),
        min_size=1,
        max_size=6,
    ).map(lambda pairs: [part for p in pairs for part in p])
    entry = st.one_of(good, st.tuples(good, swaps, extra).map(corrupt), anything)
    return st.lists(entry, min_size=1, max_size=8)


def expected_outcome(flat: list[bytes], series_id: str) -> str:
    """What the worker must do with this raw entry: a dead reason, "event" or "ack"."""
    fields = decode_entry("0-0", flat)
    if isinstance(fields, DeadLetter):
        return fields.reason
    verdict = parse_reading("0-0", fields)
    if isinstance(verdict, DeadLetter):
        return verdict.reason
    if verdict.version is not None and (verdict.series_id, verdict.version) != (series_id, 1):
        return "unknown_version"
    return "event" if verdict.series_id == series_id and verdict.value > 130 else "ack"


def test_any_bytes_in_any_field_end_acknowledged_or_dead_lettered(
    settings: Settings, client: httpx.Client, raw_redis: redis.Redis
) -> None:
    series_id = fitted_series(client)

    @hypothesis_settings(max_examples=50)
    @given(_entries(series_id))
    def check(batch: list[list[bytes]]) -> None:
        s = stream_settings(settings)
        ids = [xadd(raw_redis, s.stream_readings, *flat) for flat in batch]

        worker, _ = run_worker(s)  # raises if the worker does

        dead = dead_letters(raw_redis, s.stream_dead)
        sources = [f[b"source_id"].decode() for _, f in raw_redis.xrange(s.stream_anomalies)]
        for entry_id, flat in zip(ids, batch, strict=True):
            outcome = expected_outcome(flat, series_id)
            if outcome in ("event", "ack"):
                assert entry_id not in dead, (flat, dead[entry_id])
                assert sources.count(entry_id) == (outcome == "event"), flat
            else:
                assert dead[entry_id]["reason"] == outcome, (flat, dead[entry_id])
                assert entry_id not in sources
                # Every entry with bytes that are not UTF-8, in names or values, is this one.
                if any(_not_utf8(part) for part in flat):
                    assert outcome == "bad_encoding"
        assert set(dead) <= set(ids)
        info = raw_redis.xinfo_groups(s.stream_readings)[0]  # type: ignore[index]
        assert info["pending"] == 0 and info["last-delivered-id"].decode() == ids[-1]
        assert worker.processed == len(ids)

    check()


def _not_utf8(part: bytes) -> bool:
    try:
        part.decode()
    except UnicodeDecodeError:
        return True
    return False
