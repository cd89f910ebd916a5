"""The points each version's plot draws, kept per version: versions never change once stored,
so a version's training data is read once, not on every GET /plot."""

from __future__ import annotations

import asyncio
from collections import OrderedDict

from prometheus_client import CollectorRegistry, Counter
from starlette.concurrency import run_in_threadpool

from api.plotting import PlotPoints, plot_points
from detector.kinds.registry import STATEFUL
from detector.store.codec import ModelVersion
from detector.store.models import ModelStore


class PlotCache:
    """A least-recently-used map of (series, version) to ``PlotPoints``; concurrent first
    plots of one version share one read of its training data."""

    def __init__(self, size: int, max_points: int, registry: CollectorRegistry) -> None:
        self.size = size
        self.max_points = max_points
        self._points: OrderedDict[tuple[str, int], PlotPoints] = OrderedDict()
        self._loading: dict[tuple[str, int], asyncio.Future[PlotPoints]] = {}
        self.requests = Counter(
            "plot_cache_requests",
            "GET /plot lookups of a version's plotted points, by result (hit, miss).",
            ["result"],
            registry=registry,
        )

    async def points(self, store: ModelStore, found: ModelVersion) -> PlotPoints:
        key = (found.series_id, found.version)
        if key in self._points:
            self._points.move_to_end(key)
            self.requests.labels("hit").inc()
            return self._points[key]
        if key in self._loading:
            self.requests.labels("hit").inc()
            return await asyncio.shield(self._loading[key])
        self.requests.labels("miss").inc()
        loading: asyncio.Future[PlotPoints] = asyncio.get_running_loop().create_future()
        self._loading[key] = loading
        try:
            data = await store.training_data(found.series_id, found.version)
            params = (
                await store.params(found.series_id, found.version)
                if found.model.kind in STATEFUL
                else None
            )
            points = await run_in_threadpool(plot_points, found, data, self.max_points, params)
        except asyncio.CancelledError:
            loading.cancel()
            raise
        except BaseException as exc:
            loading.set_exception(exc)
            loading.exception()  # retrieved: a failure no one else awaited is not logged
            raise
        finally:
            del self._loading[key]
        loading.set_result(points)
        if self.size:
            self._points[key] = points
            while len(self._points) > self.size:
                self._points.popitem(last=False)
        return points
