"""Backfill: a history scored through the stream pipeline, as if it were streamed, apart from
the live stream.

A backfill job runs ``detector.pipeline.Pipeline`` — the live workers' parsing, model
resolution, scoring, stateful folds and episodes — over readings given in order, in chunks.
What it writes is its own: the stateful kinds' states and the episodes live under the job's
key namespace (``backfill:{<job>}:state:{<series>}``, expiring ``BACKFILL_STATE_TTL_SECONDS``
after its last chunk), its events go to ``STREAM_BACKFILL`` with a ``backfill`` field naming
the job, its anomaly history rows say ``source = 'backfill'`` (``GET /anomalies`` shows them
only when asked), and its metrics stay off the live workers' (no episode onset of a backfill
reaches an alert). So a job neither reads nor changes the live series' states and episodes,
and the same readings give the same events, bounds, scores, tests and episodes as streamed
live, except for their ids: reading i of a job has the source id ``backfill/<job>/<i>``.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from prometheus_client import CollectorRegistry

from detector.errors import InvalidInputError
from detector.kinds.training import FloatArray, IntArray
from detector.metrics import WorkerMetrics
from detector.pipeline import Pipeline
from detector.redis_keys import backfill_namespace, episode_key, state_key
from detector.settings import Settings
from detector.state.series import Below, SeriesStates
from detector.store.models import ModelStore
from detector.wire.readings import DeadLetter, ReadingBatch

log = logging.getLogger(__name__)

JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# A job's reading indices stay below this: an index is part of the reading's source id and
# of its state's bookkeeping (stored as a JSON integer), and every JSON client reads
# integers below 2**53 exactly.
MAX_INDEX = 2**53


def new_job_id() -> str:
    return uuid.uuid4().hex[:16]


def backfill_source_id(job: str, index: int) -> str:
    """Reading ``index`` of a job: ordered by index, as stream entry ids are by position."""
    return f"backfill/{job}/{index}"


@dataclass(slots=True)
class BackfillResult:
    """What scoring some of a job's readings found. ``events`` are the fields written to the
    backfill stream, in reading order; ``dead`` the readings refused (with the live stream's
    reasons); ``next_index`` the index the job's next reading takes."""

    job: str
    next_index: int
    scored: int = 0
    no_model: int = 0
    episodes_opened: int = 0
    events: list[dict[str, str]] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)


class Backfill:
    """One backfill job (``job``: a new id when None). ``score`` may be called again with the
    job's next readings: states and episodes carry over from one call to the next."""

    def __init__(self, settings: Settings, store: ModelStore, job: str | None = None) -> None:
        if job is None:
            job = new_job_id()
        elif not JOB_ID.fullmatch(job):
            raise InvalidInputError(
                f"a backfill job id is 1–64 letters, digits, '-' or '_' (got {job!r})"
            )
        self.job = job
        self.settings = settings
        self.redis = store.redis
        self.namespace = backfill_namespace(job)
        # Its own registry: a backfill's readings and onsets never move the live counters.
        self.metrics = WorkerMetrics(CollectorRegistry(), transport="backfill")
        self.pipeline = Pipeline(
            settings,
            store,
            source=f"backfill:{job}",
            metrics=self.metrics,
            streams=SeriesStates(self.redis, store, namespace=self.namespace),
            namespace=self.namespace,
            history_source="backfill",
        )

    async def score(
        self,
        series_ids: Sequence[str],
        timestamps: Sequence[int] | IntArray,
        values: Sequence[float] | FloatArray,
        *,
        versions: Sequence[int | None] | None = None,
        start: int = 0,
    ) -> BackfillResult:
        """Score readings given as columns, already checked with the stream's rules (the CLI
        checks each CSV row as ``publish`` does; the API checks its body): reading i is
        (series_ids[i], timestamps[i], values[i]), pinned to ``versions[i]`` if given (None:
        the latest), in order, the first taking index ``start``. Their events are written to
        the backfill stream chunk by chunk (``BACKFILL_CHUNK`` readings)."""
        n = len(series_ids)
        if not len(timestamps) == len(values) == n or (versions is not None and len(versions) != n):
            raise InvalidInputError("a backfill's columns must have the same length")
        if not 0 <= start <= MAX_INDEX - n:
            raise InvalidInputError(
                f"a backfill's reading indices run from start ({start}) and stay below 2**53:"
                f" start must be in [0, {MAX_INDEX - n}] for {n} readings"
            )
        result = BackfillResult(self.job, start + n)
        size = self.settings.backfill_chunk
        for lo in range(0, n, size):
            hi = min(n, lo + size)
            first = start + lo
            batch = ReadingBatch(
                [backfill_source_id(self.job, i) for i in range(first, start + hi)],
                list(series_ids[lo:hi]),
                np.asarray(timestamps[lo:hi], dtype=np.int64),
                np.asarray(values[lo:hi], dtype=np.float64),
                None if versions is None or not any(versions[lo:hi]) else list(versions[lo:hi]),
            )
            await self._chunk(batch, first, result)
        return result

    async def _chunk(self, batch: ReadingBatch, first: int, result: BackfillResult) -> None:
        # Readings before this chunk are done for good: their redelivery bookkeeping goes.
        outcome = await self.pipeline.run_batch(batch, acknowledged=Below((first, 0)))
        events = list(outcome.events.values())
        for fields in events:
            fields["backfill"] = self.job
        ttl = self.settings.backfill_state_ttl_seconds
        async with self.redis.pipeline(transaction=False) as pipe:
            for fields in events:
                pipe.xadd(
                    self.settings.stream_backfill,
                    fields,  # type: ignore[arg-type]
                    maxlen=self.settings.stream_anomalies_maxlen,
                    approximate=True,
                )
            for series_id in set(batch.series_ids):
                pipe.expire(state_key(series_id, self.namespace), ttl)
                pipe.expire(episode_key(series_id, self.namespace), ttl)
            await pipe.execute()
        self.pipeline.count(outcome, len(events))
        result.scored += outcome.scored
        result.no_model += outcome.no_model
        result.events += events
        result.dead += outcome.dead
        result.episodes_opened += sum(fields.get("onset") == "1" for fields in events)
        log.info(
            "backfill %s: readings %d–%d scored, %d anomalies",
            self.job,
            first,
            first + len(batch) - 1,
            len(events),
        )
