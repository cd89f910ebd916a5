"""Trimming `readings`: it keeps up with the workers, and never drops what a group still needs."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import redis
from redis.asyncio import Redis as AsyncRedis

from detector.settings import Settings
from detector.store.connections import redis_client as async_redis
from detector.store.connections import reply_twin
from detector.transports.redis.consumer_group import StreamOps
from ingest.publisher import Publisher
from tests.support.services import ROOT, service_env
from tests.support.streams import stream_settings

# XTRIM MINID ~ frees whole macro nodes only: what is left below the bound is at most a node.
NODE_SLACK = 10_000
START = 1_700_000_000

# Entries below every group's oldest pending or undelivered entry, counted inside Redis (a
# snapshot: what the worker finished but trimming has not yet removed). COUNT caps the work.
_FINISHED_LEFT = """
local least = nil
for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
    local info = {}
    for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
    local pending = redis.call('XPENDING', KEYS[1], info['name'])
    local upto = info['last-delivered-id']
    if pending[1] > 0 then upto = '(' .. pending[2] end
    local n = #redis.call('XRANGE', KEYS[1], '-', upto, 'COUNT', ARGV[1])
    if least == nil or n < least then least = n end
end
return least or 0
"""


def _ops(s: Settings, client: AsyncRedis) -> StreamOps:
    return StreamOps(
        client,
        readings=s.stream_readings,
        anomalies=s.stream_anomalies,
        dead=s.stream_dead,
        group=s.stream_group,
        anomalies_maxlen=1000,
        dead_maxlen=1000,
        raw=reply_twin(s, client),
    )


def _fill(client: redis.Redis, stream: str, count: int) -> list[str]:
    ids: list[str] = []
    pipe = client.pipeline(transaction=False)
    for n in range(count):
        pipe.xadd(stream, {"series_id": "trim-test", "timestamp": str(n), "value": "1"})
        if len(pipe) == 5000:
            ids += pipe.execute()
    return ids + pipe.execute()


def test_trimming_removes_everything_finished_and_nothing_a_group_needs(settings, redis_client):
    s = stream_settings(settings)
    stream = s.stream_readings
    ids = _fill(redis_client, stream, 30_000)
    # Group `detector`: 25,000 delivered, the first 24,000 finished (acknowledged through the
    # commit), 1,000 pending, 5,000 undelivered. Group `audit`: 12,000 delivered, all acked.
    redis_client.xgroup_create(stream, s.stream_group, id="0")
    redis_client.xgroup_create(stream, "audit", id="0")
    redis_client.xreadgroup("audit", "a", {stream: ">"}, count=12_000)
    redis_client.xack(stream, "audit", *ids[:12_000])

    async def scenario() -> tuple[int, int, str | None, list[str], int]:
        client = async_redis(s)
        try:
            ops = _ops(s, client)
            entries = await ops.read("w", ">", 25_000)
            assert len(entries) == 25_000
            await ops.commit([e[0] for e in entries[:24_000]], [])
            after_commit = redis_client.xlen(stream)
            redis_client.xgroup_destroy(stream, "audit")
            minid = await ops.trim_readings()
            after_trim = redis_client.xlen(stream)
            kept = [str(i) for i, _ in redis_client.xrange(stream, ids[24_000], "+")]
            await ops.commit([e[0] for e in entries[24_000:]], [])
            await ops.trim_readings()
            return after_commit, after_trim, minid, kept, redis_client.xlen(stream)
        finally:
            await client.aclose()

    after_commit, after_trim, minid, kept, drained = asyncio.run(scenario())
    # The commit trimmed below `audit`'s undelivered entries (its bound is the lower one) ...
    assert 18_000 <= after_commit <= 18_000 + NODE_SLACK // 100
    # ... and with `audit` gone, one call trims past the 10,000 a default-limited XTRIM takes,
    # down to `detector`'s oldest pending entry, which is kept with everything after it.
    assert minid == ids[24_000]
    assert 6_000 <= after_trim <= 6_000 + NODE_SLACK // 100
    assert kept == ids[24_000:]
    # With nothing pending, the undelivered 5,000 are still all there.
    assert 5_000 <= drained <= 5_000 + NODE_SLACK // 100
    assert [str(i) for i, _ in redis_client.xrange(stream, ids[25_000], "+")] == ids[25_000:]


@pytest.mark.slow
@pytest.mark.timeout(300)  # the drain alone can take a minute on a loaded 2-core machine
def test_readings_stay_bounded_while_one_worker_keeps_up_with_the_publisher(
    settings, redis_client, tmp_path: Path
):
    s = stream_settings(settings)
    stream, count, batch = s.stream_readings, 300_000, s.stream_batch_count
    env = service_env(
        s,
        STREAM_READINGS=stream,
        STREAM_ANOMALIES=s.stream_anomalies,
        STREAM_DEAD=s.stream_dead,
        STREAM_BLOCK_MS="200",
        METRICS_PORT="0",
    )
    finished_left = redis_client.register_script(_FINISHED_LEFT)
    peak = {"finished_left": 0, "xlen": 0}
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            if redis_client.exists(stream):
                peak["finished_left"] = max(
                    peak["finished_left"], int(finished_left(keys=[stream], args=[100_000]))
                )
                peak["xlen"] = max(peak["xlen"], int(redis_client.xlen(stream)))
            time.sleep(0.25)

    with open(tmp_path / "worker.log", "ab") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "detector", "--consumer", "trim", "--log-level", "warning"],
            env=env,
            cwd=ROOT,
            stdout=log,
            stderr=log,
        )
    watcher = threading.Thread(target=watch, daemon=True)
    try:
        watcher.start()
        prefix = f"trim-{uuid.uuid4().hex[:8]}"  # series without a model: scored as such
        rows = [
            {"series_id": f"{prefix}-{n % 100}", "timestamp": str(START + n // 100), "value": "1.5"}
            for n in range(count)
        ]
        started = time.monotonic()
        with Publisher(redis_client, stream=stream, batch_size=batch) as publisher:
            for fields in rows:
                publisher.publish_fields(fields)
        publish_seconds = time.monotonic() - started
        caught_up = _wait_caught_up(redis_client, s, timeout=180)
        drain_seconds = time.monotonic() - started
        assert caught_up, (
            f"the worker did not catch up ({worker.poll()=}): "
            f"{redis_client.xinfo_groups(stream)}, {redis_client.xrevrange(stream, count=1)}"
        )
        # The next trim comes within the maintenance interval.
        deadline = time.monotonic() + s.stream_trim_interval_ms / 1000 + 2
        while redis_client.xlen(stream) > 2 * batch + NODE_SLACK and time.monotonic() < deadline:
            time.sleep(0.1)
        left = redis_client.xlen(stream)
    finally:
        done.set()
        watcher.join(10)
        worker.terminate()
        worker.wait(30)
    rate = count / publish_seconds
    print(
        f"published {rate:,.0f} readings/s, all scored after {drain_seconds:.1f} s; peak XLEN "
        f"{peak['xlen']:,}, peak finished-untrimmed {peak['finished_left']:,}, left {left:,}"
    )
    assert rate > 5_000  # faster than a default-limited XTRIM every 2 s can remove
    assert left <= 2 * batch + NODE_SLACK
    # Finished entries never pile up: at most a few batches, plus a node, at any moment.
    assert peak["finished_left"] <= 4 * batch + NODE_SLACK


def _wait_caught_up(client: redis.Redis, s: Settings, *, timeout: float) -> bool:
    """True once the group has nothing undelivered and nothing pending."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        groups = {g["name"]: g for g in client.xinfo_groups(s.stream_readings)}
        group = groups.get(s.stream_group)
        if group and not group["pending"]:
            after = f"({group['last-delivered-id']}"
            if not client.xrange(s.stream_readings, after, "+", count=1):
                return True
        time.sleep(0.1)
    return False
