"""Fitting a new version of a series: the one service every front end calls."""

from __future__ import annotations

import asyncio
from typing import Any

from detector.kinds.base import Direction, FitOptions, Fitted
from detector.kinds.moments import median_interval
from detector.kinds.registry import get_kind
from detector.kinds.training import TrainingData, prepare_training_data
from detector.settings import Settings
from detector.store.codec import ModelVersion
from detector.store.fit_rows import NewFit
from detector.store.models import ModelStore

# Fits at least this long are validated and fitted in a worker thread, off the event loop.
_THREAD_FIT_POINTS = 20_000


def fit_training_data(
    timestamps: Any,
    values: Any,
    settings: Settings,
    *,
    sigma: float | None = None,
    direction: Direction | None = None,
    kind: str | None = None,
) -> tuple[TrainingData, Fitted]:
    """Check the training points against every rule and fit the kind (pure, no I/O)."""
    plugin = get_kind(kind or settings.default_kind)
    data = prepare_training_data(
        timestamps,
        values,
        min_points=settings.min_training_points,
        max_points=settings.max_training_points,
    )
    options = FitOptions(
        sigma=settings.default_sigma if sigma is None else sigma,
        direction=direction or settings.default_direction,
    )
    return data, plugin.fit(data, options)


def new_fit(
    series_id: str,
    timestamps: Any,
    values: Any,
    settings: Settings,
    *,
    sigma: float | None = None,
    direction: Direction | None = None,
    kind: str | None = None,
) -> NewFit:
    """``fit_training_data``, and what a version keeps beside the kind's parameters (its
    cadence): a version ready to store (pure, no I/O). A single fit and every series of a bulk
    fit (``detector.bulk_fit``) are made here."""
    data, fitted = fit_training_data(
        timestamps, values, settings, sigma=sigma, direction=direction, kind=kind
    )
    params = dict(fitted.params)
    cadence = fit_cadence(data.timestamps)
    if cadence is not None:  # kept with the version for the silent-series watch
        params["cadence"] = cadence
    return NewFit(series_id, data, fitted.model, params)


async def fit_version(
    store: ModelStore,
    settings: Settings,
    series_id: str,
    timestamps: Any,
    values: Any,
    *,
    sigma: float | None = None,
    direction: Direction | None = None,
    kind: str | None = None,
) -> ModelVersion:
    """Validate, fit and store a new version of ``series_id``; it becomes the latest."""
    args = (series_id, timestamps, values, settings)
    options: dict[str, Any] = {"sigma": sigma, "direction": direction, "kind": kind}
    if len(values) >= _THREAD_FIT_POINTS:
        fit = await asyncio.to_thread(new_fit, *args, **options)
    else:
        fit = new_fit(*args, **options)
    (stored,) = await store.save_fits([fit])
    return stored


def fit_cadence(timestamps: Any) -> float | None:
    """A series' cadence (``median_interval``), stored in ``params["cadence"]``; versions
    fitted before it was stored have none, and the stream watch falls back to observed
    spacing."""
    return median_interval(timestamps)
