"""Scoring validated readings into anomaly events: shared by the Redis and Kafka workers."""

from __future__ import annotations

import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np

from detector.errors import ModelNotFoundError
from detector.kinds.registry import MultiscaleModel
from detector.kinds.static import StaticModel
from detector.state.multiscale import MultiscaleStreams, StreamReading
from detector.store.latest import LatestVersions
from detector.store.models import ModelStore
from detector.wire.events import event_fields
from detector.wire.readings import Reading, ReadingBatch


@dataclass(slots=True)
class ScoredBatch:
    """What scoring a batch found: the events of anomalous readings (by source id, in scoring
    order), readings of series without a model, and pinned versions that do not exist."""

    events: dict[str, dict[str, str]] = field(default_factory=dict)
    no_model: int = 0
    unknown: list[tuple[str, str]] = field(default_factory=list)  # (source id, why)
    opened: int = 0  # episodes opened by stateful kinds (their own alerts)


async def score_readings(
    readings: Sequence[Reading], store: ModelStore, latest: LatestVersions
) -> ScoredBatch:
    """Score readings: the latest version from ``latest`` unless a reading pins one."""
    return await score_batch(ReadingBatch.from_readings(readings), store, latest)


# Direction codes of the per-model parameter rows.
_ABOVE, _BELOW, _BOTH = 0, 1, 2
_DIRECTION_CODES = {"above": _ABOVE, "below": _BELOW, "both": _BOTH}


async def score_batch(
    batch: ReadingBatch,
    store: ModelStore,
    latest: LatestVersions,
    streams: MultiscaleStreams | None = None,
) -> ScoredBatch:
    """Score a whole batch with a handful of numpy operations, whatever its mix of series.

    Each distinct (series, version) gets one row of model parameters (μ, σ, μ ± kσ and the
    direction); every reading is mapped to its row and compared at once, with the same strict
    inequalities as ``StaticModel.score``. Python work per reading is a dict lookup; events
    are built only for the anomalous ones, in batch order.

    With ``streams``, readings whose latest model is multiscale (and that pin no version) are
    folded into their series' streaming state instead (``detector.state.multiscale``); their
    events carry the detector's own episode fields. Without it (or for pinned readings) a
    multiscale version is scored by its stateless μ ± kσ rule, as ``POST /predict`` does.
    """
    scored = ScoredBatch()
    n = len(batch)
    if n == 0:
        return scored
    series_ids, versions = batch.series_ids, batch.versions
    if versions is None:
        pointers = await latest.resolve(dict.fromkeys(series_ids))
        keys: Sequence[Hashable] = series_ids
        pairs: dict[Hashable, tuple[str, int | None]] = {s: (s, v) for s, v in pointers.items()}
    else:
        pointers = await latest.resolve(
            dict.fromkeys(s for s, v in zip(series_ids, versions, strict=True) if v is None)
        )
        keys = [
            (s, pointers[s] if v is None else v) for s, v in zip(series_ids, versions, strict=True)
        ]
        pairs = {key: key for key in dict.fromkeys(keys)}  # type: ignore[misc]
    # Row 0 stands for "no model": NaN bounds never compare true.
    rows: dict[Hashable, int] = {}
    models: list[tuple[int, StaticModel] | None] = [None]
    missing: dict[int, str] = {}  # row → why its pinned version does not exist
    for key, (series_id, version) in pairs.items():
        if version is None:
            rows[key] = 0
            continue
        found = store.cache.get((series_id, version))
        if found is None:
            try:
                found = await store.get(series_id, version)
            except ModelNotFoundError as exc:
                rows[key] = len(models)
                missing[len(models)] = exc.detail
                models.append(None)
                continue
        rows[key] = len(models)
        models.append((version, found.model))
    nan = (np.nan, np.nan, np.nan, np.nan, _ABOVE)
    params = np.array(
        [
            nan
            if m is None
            else (m[1].mean, m[1].std, m[1].lower, m[1].upper, _DIRECTION_CODES[m[1].direction])
            for m in models
        ]
    )
    direction = params[:, 4].astype(np.int8)
    index = np.fromiter(map(rows.__getitem__, keys), dtype=np.intp, count=n)
    values = batch.values
    above = values > params[index, 3]
    below = values < params[index, 2]
    kind = direction[index]
    anomaly = np.where(kind == _ABOVE, above, np.where(kind == _BELOW, below, above | below))
    stream_rows: list[int] = []
    if streams is not None and any(
        m is not None and isinstance(m[1], MultiscaleModel) for m in models
    ):
        stateful = np.array([m is not None and isinstance(m[1], MultiscaleModel) for m in models])
        in_stream = stateful[index]
        if versions is not None:
            in_stream &= np.array([v is None for v in versions], dtype=bool)
        anomaly = anomaly & ~in_stream
        stream_rows = np.flatnonzero(in_stream).tolist()
    without_model = np.array([m is None for m in models])[index]
    scored.no_model = int(np.count_nonzero(without_model))
    if missing:  # a pinned version that does not exist; the latest pointer raced a withdrawal
        for i in np.flatnonzero(np.isin(index, list(missing))).tolist():
            if versions is not None and versions[i] is not None:
                scored.no_model -= 1
                scored.unknown.append((batch.source_ids[i], missing[int(index[i])]))
    detected_at = time.time()
    for i in np.flatnonzero(anomaly).tolist():
        row = int(index[i])
        version, model = models[row]  # type: ignore[misc]
        mean, std = params[row, 0], params[row, 1]
        scored.events[batch.source_ids[i]] = event_fields(
            batch.reading(i),
            version=version,
            mean=model.mean,
            std=model.std,
            lower=model.lower,
            upper=model.upper,
            score=float((values[i] - mean) / std),
            detected_at=detected_at,
        )
    if stream_rows and streams is not None:
        folded, scored.opened = await streams.fold(
            [
                StreamReading(
                    batch.source_ids[i],
                    batch.series_ids[i],
                    int(batch.timestamps[i]),
                    float(values[i]),
                    models[int(index[i])][0],  # type: ignore[index]
                )
                for i in stream_rows
            ],
            detected_at=detected_at,
        )
        if folded:
            merged = scored.events | folded
            scored.events = {i: merged[i] for i in batch.source_ids if i in merged}
    return scored
