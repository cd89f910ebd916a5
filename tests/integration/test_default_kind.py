"""The shipped default kind, end to end: a fit without options streams with it, while REST
predict keeps the version's μ ± kσ rule; ``static`` is one option away."""

from __future__ import annotations

import asyncio
import uuid

import numpy as np
import redis

from detector.settings import Settings
from tests.support.api import extra_api
from tests.support.streams import events, publish, run_worker_async, stream_settings

START = 1_700_000_000
STEP = 300


def test_a_fit_without_options_streams_with_the_default_kind(
    settings: Settings, redis_client: redis.Redis
) -> None:
    default = Settings.model_fields["default_kind"].default
    assert default == "seasonal"  # chosen on evidence: docs/detection-quality.md
    rng = np.random.default_rng(11)
    series_id = f"dk-{uuid.uuid4().hex[:10]}"
    ts = [START + STEP * i for i in range(600)]
    values = [round(float(v), 6) for v in 100.0 + rng.normal(0.0, 1.0, 600)]
    with extra_api(settings, DEFAULT_KIND="") as api:  # the service's own default
        fitted = api.post(f"/fit/{series_id}", json={"timestamps": ts, "values": values}).json()
        assert fitted["kind"] == default
        # REST keeps the contract's rule: anomalous iff beyond μ + 3σ of the training data.
        for value, expected in ((fitted["upper"] + 0.01, True), (fitted["upper"] - 0.01, False)):
            got = api.post(f"/predict/{series_id}", json={"timestamp": START, "value": value})
            assert got.json()["anomaly"] is expected
        static = api.post(
            f"/fit/{series_id}-s", json={"timestamps": ts, "values": values, "kind": "static"}
        )
        assert static.json()["kind"] == "static"

    s = stream_settings(settings, stream_batch_count=100)
    stream = [round(float(v), 6) for v in 100.0 + rng.normal(0.0, 1.0, 200)]
    stream[100] = 150.0  # one spike of 50 σ
    first = START + STEP * 600
    publish(
        redis_client,
        s.stream_readings,
        [(series_id, first + STEP * i, v) for i, v in enumerate(stream)],
    )
    asyncio.run(run_worker_async(s))
    found = [f for _, f in events(redis_client, s.stream_anomalies)]
    # One event: the spike is the point test's, and learned clipped, so the window's tests
    # do not keep firing on the normal readings after it.
    assert [int(f["timestamp"]) for f in found] == [first + STEP * 100]
    assert found[0]["kind"] == default and found[0]["test"] == "point"
    assert found[0]["onset"] == "1"
