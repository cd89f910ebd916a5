"""Fault tests' shared parts: readings with known fates, feeders, accounting, reports.

Accounting: every reading is published with a known fate (anomalous, normal, a series
without a model, or poison), so each is accounted for by its entry id: anomalous → exactly one
event with that `source_id`; poison → exactly one dead letter; the rest → acknowledged (the
group has delivered every entry and nothing is pending). The numbers measured are printed
(`pytest -s`) and quoted in docs/operations.md ("Tested failure behaviour").
"""

from __future__ import annotations

import random
import socket
import subprocess
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from detector.settings import Settings
from tests.support.polling import REDIS_CONNECTION_ERRORS, wait_for

START = 1_700_000_000


BASE_MS = 1_700_000_000_000


SERIES_COUNT = 4


TRAINING = [90.0, 110.0] * 5  # μ 100, σ exactly 10 (scaled per series below)


def pg_rows(settings: Settings, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(settings.postgres_conninfo(), autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()  # type: ignore[arg-type]


# ---------------------------------------------------------------- readings with known fates


@dataclass
class Plan:
    """N readings and their fates, with explicit entry ids (so a retried XADD is idempotent)."""

    series: list[str]
    count: int
    sigma: float = 3.0
    ids: list[str] = field(init=False)
    rows: list[dict[str, str]] = field(init=False)
    anomalous: set[int] = field(init=False, default_factory=set)
    dead: set[int] = field(init=False, default_factory=set)
    no_model: set[int] = field(init=False, default_factory=set)

    def __post_init__(self) -> None:
        self.ids = [f"{BASE_MS}-{n + 1}" for n in range(self.count)]
        self.rows = []
        unknown = f"nomodel-{uuid.uuid4().hex[:8]}"
        for n in range(self.count):
            i = n % len(self.series)
            center = 100.0 * (i + 1)
            # Normal readings stay within ±0.9 kσ of μ (σ is 10).
            series_id, value = self.series[i], center + ((n * 7) % 41 - 20) * 0.45 * self.sigma
            if n % 50 == 49:
                value_text = "not-a-number"  # poison: dead letter `bad_value`
                self.dead.add(n)
            else:
                if n % 10 == 3:
                    value = center + 10.0 * self.sigma + 5.0  # above μ + kσ
                    self.anomalous.add(n)
                elif n % 25 == 7:
                    series_id = unknown  # valid, but no model: acknowledged, no event
                    self.no_model.add(n)
                value_text = repr(value)
            self.rows.append(
                {"series_id": series_id, "timestamp": str(START + n), "value": value_text}
            )

    def index(self) -> dict[str, int]:
        return {entry_id: n for n, entry_id in enumerate(self.ids)}


def fit_series(base_url: str, count: int = SERIES_COUNT, *, sigma: float = 3.0) -> list[str]:
    """Fits series i (over REST, as users do) with μ = 100 (i + 1) and σ = 10."""
    series = [f"f-{uuid.uuid4().hex[:10]}" for _ in range(count)]
    with httpx.Client(base_url=base_url, timeout=60) as http:
        for i, series_id in enumerate(series):
            values = [v + 100.0 * i for v in TRAINING]
            body = {"timestamps": list(range(len(values))), "values": values, "sigma": sigma}
            answer = http.post(f"/fit/{series_id}", json=body)
            assert answer.status_code == 200, answer.text
    return series


class Feeder(threading.Thread):
    """Publishes a plan's readings in pipelined chunks, retrying through Redis outages.

    Ids are explicit and increasing: when a chunk is retried after a connection error, the
    entries Redis already had are refused ("equal or smaller than the top item") rather than
    added twice, so every reading is in the stream exactly once. ``lock`` is held while a
    chunk is in flight (a test takes it to fault Redis between chunks)."""

    def __init__(self, url: str, stream: str, plan: Plan, *, chunk: int = 200, pause: float = 0):
        super().__init__(daemon=True)
        self.client = redis.Redis.from_url(
            url,
            decode_responses=True,
            socket_timeout=5,
            socket_connect_timeout=1,
            retry=Retry(NoBackoff(), 0),  # we retry ourselves, idempotently
        )
        self.stream, self.plan, self.chunk, self.pause = stream, plan, chunk, pause
        self.lock = threading.Lock()
        self.sent = 0
        self.retries = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while self.sent < self.plan.count:
                end = min(self.sent + self.chunk, self.plan.count)
                with self.lock:
                    try:
                        self._publish(self.sent, end)
                    except REDIS_CONNECTION_ERRORS:
                        self.retries += 1
                        time.sleep(0.05)
                        continue
                    self.sent = end
                if self.pause:
                    time.sleep(self.pause)
        except BaseException as exc:
            self.error = exc
        finally:
            self.client.close()

    def _publish(self, start: int, end: int) -> None:
        pipe = self.client.pipeline(transaction=False)
        for n in range(start, end):
            pipe.xadd(self.stream, self.plan.rows[n], id=self.plan.ids[n])  # type: ignore[arg-type]
        for result in pipe.execute(raise_on_error=False):
            if isinstance(result, Exception) and "equal or smaller" not in str(result):
                raise result

    def finish(self, timeout: float = 120) -> None:
        self.join(timeout)
        assert not self.is_alive(), "the feeder did not finish"
        if self.error is not None:
            raise self.error


class PredictLoop(threading.Thread):
    """Asks /predict over and over; every answer is kept by status, wrong 200s are kept too."""

    def __init__(self, base_url: str, series_id: str, value: float, expected: dict[str, Any]):
        super().__init__(daemon=True)
        self.base_url, self.series_id, self.value, self.expected = (
            base_url,
            series_id,
            value,
            expected,
        )
        self.statuses: Counter[int] = Counter()
        self.wrong: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        with httpx.Client(base_url=self.base_url, timeout=60) as http:
            while not self.stop.is_set():
                answer = http.post(
                    f"/predict/{self.series_id}", json={"timestamp": START, "value": self.value}
                )
                self.statuses[answer.status_code] += 1
                if answer.status_code == 200 and answer.json() != self.expected:
                    self.wrong.append(answer.text)
                time.sleep(0.005)

    def finish(self) -> Counter[int]:
        self.stop.set()
        self.join(60)
        return self.statuses


def group_state(client: redis.Redis, s: Settings) -> tuple[int, str]:
    """(pending entries, last-delivered id) of the detector group; (-1, "") if none."""
    if not client.exists(s.stream_readings):
        return -1, ""
    for group in client.xinfo_groups(s.stream_readings):  # type: ignore[union-attr]
        if group["name"] == s.stream_group:
            return int(group["pending"]), str(group["last-delivered-id"])
    return -1, ""


def drained(client: redis.Redis, s: Settings, plan: Plan) -> bool:
    return group_state(client, s) == (0, plan.ids[-1])


@dataclass
class Accounting:
    sent: int
    events: int
    dead: int
    acknowledged_without_output: int
    duplicates: int


def account(
    client: redis.Redis, s: Settings, plan: Plan, *, only: set[int] | None = None
) -> Accounting:
    """Checks every reading of ``plan`` (or those in ``only``) is accounted for, exactly once."""
    wanted = set(range(plan.count)) if only is None else only
    events = Counter(f["source_id"] for _, f in client.xrange(s.stream_anomalies))  # type: ignore[union-attr]
    dead = Counter(f["source_id"] for _, f in client.xrange(s.stream_dead))  # type: ignore[union-attr]
    duplicates = sum(n - 1 for n in events.values()) + sum(n - 1 for n in dead.values())
    assert duplicates == 0, "a reading gave two outputs"
    assert set(events) == {plan.ids[n] for n in plan.anomalous & wanted}, "an event was lost"
    assert set(dead) == {plan.ids[n] for n in plan.dead & wanted}, "a dead letter was lost"
    pending, last = group_state(client, s)
    assert (pending, last) == (0, plan.ids[-1]), "a reading was never acknowledged"
    # The durable copy: PostgreSQL holds each event once too (unique on stream and source id).
    stored = pg_rows(
        s, "SELECT source_id FROM anomalies WHERE source_stream = %s", s.stream_readings
    )
    wanted_ids = {plan.ids[n] for n in wanted}
    assert Counter(r[0] for r in stored if r[0] in wanted_ids) == Counter(set(events))
    return Accounting(
        sent=len(wanted),
        events=len(events),
        dead=len(dead),
        acknowledged_without_output=len(wanted) - len(events) - len(dead),
        duplicates=duplicates,
    )


def report(name: str, **numbers: Any) -> None:
    print(f"\n[faults] {name}: " + ", ".join(f"{k}={v}" for k, v in numbers.items()))


# ---------------------------------------------------------------- PostgreSQL


def fit_body(points: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    return {
        "timestamps": list(range(points)),
        "values": [rng.gauss(50.0, 5.0) for _ in range(points)],
    }


# ---------------------------------------------------------------- API


def raw_fit(port: int, series_id: str, body: bytes, sent: threading.Barrier) -> tuple[int, bytes]:
    """One fit over a plain socket: we know the request is in the server's hands once
    ``sendall`` returns (the body is far larger than the socket buffers)."""
    head = (
        f"POST /fit/{series_id} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        sock.sendall(head + body)
        sent.wait()
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    reply = b"".join(chunks)
    status = int(reply.split(b" ", 2)[1]) if reply else 0
    return status, reply.partition(b"\r\n\r\n")[2]


# ---------------------------------------------------------------- Redis refusing to serve


def refusing_redis_phase(
    base_url: str,
    worker: subprocess.Popen[bytes],
    log_path: Path,
    series_id: str,
    refused: str,
) -> None:
    """While Redis refuses writes: a fit is a 503 naming Redis, predictions of a stored model
    go on, and the worker waits (it neither exits nor writes a traceback)."""
    with httpx.Client(base_url=base_url, timeout=60) as http:
        answer = http.post(f"/fit/{series_id}", json=fit_body(100, 1))
        assert answer.status_code == 503, answer.text
        assert answer.json()["dependency"] == "redis", answer.text
        assert "Redis is unavailable" in answer.json()["detail"]
        assert refused in answer.json()["detail"], answer.text
    time.sleep(3.0)  # long enough for the worker's heartbeat, reads and retries to be refused
    assert worker.poll() is None, log_path.read_text()[-3000:]


def resumed(client: redis.Redis, s: Settings, base_url: str, series_id: str) -> None:
    """After Redis serves again: fits work, and the same worker scores new readings."""
    with httpx.Client(base_url=base_url, timeout=60) as http:
        answer = http.post(
            f"/fit/{series_id}", json={"timestamps": list(range(10)), "values": TRAINING}
        )
        assert answer.status_code == 200, answer.text
    plan = Plan([series_id], 20)
    plan.ids = [f"{int(time.time() * 1000)}-{n + 1}" for n in range(plan.count)]
    Feeder(s.redis_connection_url(), s.stream_readings, plan).run()
    wait_for(lambda: drained(client, s, plan), "the worker to resume", 60)
    events = [f["source_id"] for _, f in client.xrange(s.stream_anomalies)]  # type: ignore[union-attr]
    assert sorted(events) == sorted(plan.ids[n] for n in plan.anomalous)
    assert client.xlen(s.stream_dead) == len(plan.dead)
