"""Bulk fit: many series' new versions in one job (``POST /fit``, ``anomaly-ingest fit``).

The rules are a single fit's: every series is validated and fitted by ``new_fit``
(``fit_training_data``'s checks, the kind's fit, the cadence), refused with the message its
single fit would answer, and stored by ``ModelStore.save_fits`` (the same version allocation,
rows, commit and Redis writes as ``POST /fit/{series_id}``). What a job changes is only how
many go at once: a batch of ``BATCH_SERIES`` series takes one allocation statement, one
transaction (COPY of the version rows and of the points) and pipelined Redis writes, and the
next batch is fitted in a thread while the current one is stored.

A series is stored whole or not at all (its batch commits all or none). A batch PostgreSQL
refuses (a constraint, a trigger) is stored again in halves, down to the series that is
refused, so one bad series never costs the others. A store that is unavailable stops the job:
the batches committed before it stay stored.

MLflow: a job is one run (``fit_jobs``, logged by the tracker), not one run a version.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np

from detector.errors import (
    AnomalyError,
    InvalidInputError,
    StoreRefusedError,
    StoreUnavailableError,
    TooLargeError,
)
from detector.fitting import new_fit
from detector.identifiers import validate_series_id
from detector.kinds.base import Direction
from detector.kinds.registry import get_kind
from detector.kinds.static import check_options
from detector.settings import Settings
from detector.store.codec import ModelVersion
from detector.store.fit_rows import NewFit
from detector.store.models import ModelStore

# Series a batch stores at once: one allocation, one transaction, one Redis pipeline.
BATCH_SERIES: Final = 1000
# Refused series the job's record (and its MLflow run) keeps by name.
REFUSALS_KEPT: Final = 100


@dataclass(frozen=True, slots=True)
class SeriesPoints:
    """One series' training points as given (not yet checked)."""

    series_id: str
    timestamps: Any
    values: Any


@dataclass(frozen=True, slots=True)
class Refusal:
    """A series not fitted, and why: the error its single fit would raise."""

    series_id: str
    error: AnomalyError

    @property
    def detail(self) -> str:
        return self.error.detail


@dataclass(frozen=True, slots=True)
class BatchOutcome:
    """What one batch stored and refused."""

    stored: list[ModelVersion]
    refused: list[Refusal]


@dataclass
class JobSummary:
    job: int
    fitted: int = 0
    refused: int = 0
    points: int = 0
    seconds: float = 0.0
    refusals: list[Refusal] = field(default_factory=list)  # the first REFUSALS_KEPT


def group_columns(series_ids: Any, timestamps: Any, values: Any) -> Iterator[SeriesPoints]:
    """Rows of many series, in any order (``series_ids`` a pyarrow or Python sequence of
    strings, one a row), as one ``SeriesPoints`` a series, in order of first appearance;
    each series' points keep the rows' order (the fit sorts them by timestamp)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not isinstance(series_ids, pa.Array | pa.ChunkedArray):
        series_ids = pa.array(series_ids, type=pa.string())
    encoded = pc.dictionary_encode(series_ids)
    if isinstance(encoded, pa.ChunkedArray):
        encoded = encoded.unify_dictionaries().combine_chunks()
    codes = np.asarray(encoded.indices.to_numpy(zero_copy_only=False), dtype=np.intp)
    names = [str(name) for name in encoded.dictionary.to_pylist()]
    order = np.argsort(codes, kind="stable")
    ends = np.cumsum(np.bincount(codes, minlength=len(names)))
    ts, vals = np.asarray(timestamps)[order], np.asarray(values)[order]
    start = 0
    for name, end in zip(names, ends.tolist(), strict=True):
        yield SeriesPoints(name, ts[start:end], vals[start:end])
        start = end


class BulkFit:
    """One job: ``run`` fits and stores the series it is given, batch by batch."""

    def __init__(
        self,
        store: ModelStore,
        settings: Settings,
        *,
        source: str,
        sigma: float | None = None,
        direction: Direction | None = None,
        kind: str | None = None,
        batch_series: int = BATCH_SERIES,
    ) -> None:
        self.store = store
        self.settings = settings
        self.source = source
        self.kind = kind or settings.default_kind
        self.sigma = settings.default_sigma if sigma is None else sigma
        self.direction: Direction = direction or settings.default_direction
        get_kind(self.kind)  # the job's options are checked once, before any series
        check_options(self.sigma, self.direction)
        self.batch_series = batch_series
        self._seen: set[str] = set()

    async def run(
        self,
        series: Iterable[SeriesPoints],
        on_batch: Callable[[BatchOutcome], None] | None = None,
    ) -> JobSummary:
        """Fit and store every series; ``on_batch`` is told each batch's outcome as it is
        stored. Raises StoreUnavailableError when Redis or PostgreSQL fails the job (the
        batches before it stay stored, and the error says how many series they hold)."""
        started = time.perf_counter()
        job = await self.store.start_fit_job(
            source=self.source, kind=self.kind, sigma=self.sigma, direction=self.direction
        )
        summary = JobSummary(job)
        chunks = _chunks(series, self.batch_series)
        fitting = self._fit_next(chunks)
        try:
            while (fitted := await fitting) is not None:
                fits, refused = fitted
                fitting = self._fit_next(chunks)  # fitted while this batch is stored
                stored, not_stored = await self._store(fits, job)
                outcome = BatchOutcome(stored, refused + not_stored)
                summary.fitted += len(stored)
                summary.points += sum(found.points_used for found in stored)
                summary.refused += len(outcome.refused)
                room = REFUSALS_KEPT - len(summary.refusals)
                summary.refusals += outcome.refused[: max(room, 0)]
                if on_batch is not None:
                    on_batch(outcome)
        except StoreUnavailableError as exc:
            fitting.cancel()
            summary.seconds = time.perf_counter() - started
            await self._finish(summary, failed=True)
            raise StoreUnavailableError(
                exc.dependency,
                f"{exc.detail} (bulk fit job {job}: {summary.fitted} series were stored before"
                " this; sending them again fits new versions of them)",
            ) from exc
        except BaseException:
            fitting.cancel()  # the job stays running: the tracker logs it once it is stale
            raise
        summary.seconds = time.perf_counter() - started
        await self._finish(summary, failed=False)
        return summary

    def _fit_next(
        self, chunks: Iterator[list[SeriesPoints]]
    ) -> asyncio.Future[tuple[list[NewFit], list[Refusal]] | None]:
        """The next batch taken and fitted in a thread (taking it may group a whole body's
        rows: off the event loop too); the future's result is None after the last batch."""
        return asyncio.ensure_future(asyncio.to_thread(self._fit_batch, chunks))

    def _fit_batch(
        self, chunks: Iterator[list[SeriesPoints]]
    ) -> tuple[list[NewFit], list[Refusal]] | None:
        """Each series of the next batch through a single fit's checks and fit (pure)."""
        chunk = next(chunks, None)
        if chunk is None:
            return None
        fits: list[NewFit] = []
        refused: list[Refusal] = []
        for given in chunk:
            try:
                series_id = validate_series_id(given.series_id)
                if series_id in self._seen:
                    raise InvalidInputError(
                        f"series '{series_id}' appears more than once in this bulk fit;"
                        " give each series once, with all its points"
                    )
                self._seen.add(series_id)
                fits.append(
                    new_fit(
                        series_id,
                        given.timestamps,
                        given.values,
                        self.settings,
                        sigma=self.sigma,
                        direction=self.direction,
                        kind=self.kind,
                    )
                )
            except (InvalidInputError, TooLargeError) as exc:
                refused.append(Refusal(str(given.series_id), exc))
        return fits, refused

    async def _store(
        self, fits: list[NewFit], job: int, versions: list[int] | None = None
    ) -> tuple[list[ModelVersion], list[Refusal]]:
        """``save_fits``; a batch PostgreSQL refuses is stored again in halves (under the
        version numbers allocated for it, so the other series keep theirs without a gap),
        down to the series it refuses alone (with a single fit's message)."""
        if not fits:
            return [], []
        try:
            return await self.store.save_fits(fits, job=job, cache=False, versions=versions), []
        except StoreRefusedError as exc:
            if len(fits) == 1:
                return [], [Refusal(fits[0].series_id, exc)]
            versions = exc.versions
        half = len(fits) // 2
        first, first_refused = await self._store(fits[:half], job, versions[:half])
        second, second_refused = await self._store(fits[half:], job, versions[half:])
        return first + second, first_refused + second_refused

    async def _finish(self, summary: JobSummary, *, failed: bool) -> None:
        # An id refused for breaking the id rule can hold anything (a NUL, which jsonb cannot):
        # it is kept escaped, as ASCII (a valid id is ASCII already, and kept as it is).
        refusals = [
            {"series_id": _printable(r.series_id), "detail": r.detail} for r in summary.refusals
        ]
        try:
            await self.store.finish_fit_job(
                summary.job,
                failed=failed,
                refused=summary.refused,
                refusals=refusals,
                seconds=summary.seconds,
            )
        except StoreUnavailableError:
            if not failed:
                raise
            # Already failing: the tracker logs a job that stopped making progress anyway.


def _printable(series_id: str) -> str:
    return series_id.encode("unicode_escape").decode("ascii")[:200]


def _chunks(series: Iterable[SeriesPoints], size: int) -> Iterator[list[SeriesPoints]]:
    iterator = iter(series)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk
