"""The training-data plot: points over time, μ, the μ ± kσ band, the active threshold."""

from __future__ import annotations

import io
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display; must precede pyplot's import

import matplotlib.dates as mdates
import numpy as np
import numpy.typing as npt
from matplotlib.figure import Figure

from detector.kinds.registry import stateful_kind
from detector.kinds.training import FloatArray, IntArray, TrainingData
from detector.store.codec import ModelVersion


def decimate(
    timestamps: IntArray, values: FloatArray, max_points: int
) -> tuple[IntArray, FloatArray]:
    """Keep each bucket's minimum and maximum so spikes survive; only for drawing."""
    n = values.shape[0]
    if n <= max_points:
        return timestamps, values
    buckets = max(1, max_points // 2)
    edges = np.linspace(0, n, buckets + 1).astype(np.int64)
    keep: list[int] = []
    for lo, hi in itertools.pairwise(edges):
        if hi <= lo:
            continue
        chunk = values[lo:hi]
        a, b = lo + int(np.argmin(chunk)), lo + int(np.argmax(chunk))
        keep.extend(sorted({a, b}))
    index = np.asarray(keep, dtype=np.int64)
    return timestamps[index], values[index]


# Points beyond the threshold drawn, each exactly where it is (the legend counts them all).
_OUTSIDE_SHOWN = 5000


@dataclass(frozen=True, slots=True)
class PlotPoints:
    """What the plot draws of a version's training data: a few thousand points that keep its
    shape (each bucket's minimum and maximum), the points beyond the threshold exactly (up to
    5000), and the counts and range of all of them. A version never changes, so this can be
    kept instead of its training data."""

    timestamps: IntArray
    values: FloatArray
    outside_timestamps: IntArray
    outside_values: FloatArray
    outside_count: int
    count: int
    low: float
    high: float
    # A stateful kind's expected value and bounds at ``timestamps`` (empty for static).
    stream_expected: FloatArray = field(default_factory=lambda: np.zeros(0))
    stream_lower: FloatArray = field(default_factory=lambda: np.zeros(0))
    stream_upper: FloatArray = field(default_factory=lambda: np.zeros(0))


def plot_points(
    found: ModelVersion,
    data: TrainingData,
    max_points: int = 4000,
    params: dict[str, Any] | None = None,
) -> PlotPoints:
    """The points of ``data`` the plot of ``found`` draws; ``params`` (a stateful kind's
    fitted parameters) add the expected value and bounds its stream judges by."""
    ts, values = decimate(data.timestamps, data.values, max_points)
    flags = found.model.score(data.values).anomaly
    outside_ts, outside_values = data.timestamps[flags], data.values[flags]
    kind = stateful_kind(found.model.kind)
    band: dict[str, FloatArray] = {}
    if kind is not None and params is not None:
        expected, lower, upper = kind.baseline(params, ts.astype(np.float64))
        band = {"stream_expected": expected, "stream_lower": lower, "stream_upper": upper}
    return PlotPoints(
        timestamps=ts.copy(),  # not views: the training data itself is let go
        values=values.copy(),
        outside_timestamps=outside_ts[:_OUTSIDE_SHOWN].copy(),
        outside_values=outside_values[:_OUTSIDE_SHOWN].copy(),
        outside_count=int(outside_ts.size),
        count=len(data),
        low=float(data.values.min()),
        high=float(data.values.max()),
        **band,
    )


def render_plot(
    found: ModelVersion,
    points: PlotPoints,
    *,
    detected: Sequence[Mapping[str, Any]] = (),
) -> bytes:
    """A PNG a person can read; statistics come from the model, never from the decimated data.

    ``detected``: anomalies recorded from the stream (``GET /anomalies`` rows), drawn on top,
    with the onset of each episode marked when the rows carry ``onset``.
    """
    model = found.model
    ts, values = points.timestamps, points.values
    # Matplotlib's dates end with year 9999; timestamps (up to 2^62 s) beyond it are drawn as
    # plain Unix seconds rather than failing the request.
    latest = max(
        [int(t.max()) for t in (ts, points.outside_timestamps) if t.size]
        + [int(d["timestamp"]) for d in detected],
        default=0,
    )
    as_dates = latest <= _LAST_DATE
    _dates = _days if as_dates else _seconds
    dates = _dates(ts)

    fig = Figure(figsize=(11, 5.2), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    ax.axhspan(
        model.lower,
        model.upper,
        color="tab:blue",
        alpha=0.10,
        label=f"μ ± {model.sigma:g}σ [{model.lower:.4g}, {model.upper:.4g}]",
    )
    ax.plot(
        dates,
        values,
        color="0.35",
        linewidth=0.8,
        marker="." if len(ts) <= 500 else None,
        markersize=3,
        label="training points" + (" (decimated for drawing)" if len(ts) < points.count else ""),
    )
    ax.axhline(model.mean, color="tab:blue", linewidth=1.2, label=f"μ = {model.mean:.4g}")
    for bound, side in ((model.upper, "above"), (model.lower, "below")):
        active = model.direction in (side, "both")
        ax.axhline(
            bound,
            color="tab:red" if active else "tab:blue",
            linestyle="-" if active else ":",
            linewidth=1.6 if active else 0.9,
            label=f"threshold ({side}) {bound:.4g}" if active else None,
        )
    if points.stream_expected.size:
        ax.fill_between(
            dates,
            points.stream_lower,
            points.stream_upper,
            color="tab:green",
            alpha=0.12,
            step="mid",
            label=f"{model.kind} stream bounds",
        )
        ax.plot(
            dates,
            points.stream_expected,
            color="tab:green",
            linewidth=1.0,
            label=f"{model.kind} expected value",
        )
    if points.outside_count:
        ax.scatter(
            _dates(points.outside_timestamps),
            points.outside_values,
            color="tab:red",
            s=18,
            zorder=3,
            label=f"beyond threshold ({points.outside_count})",
        )
    if detected:
        det_ts = np.asarray([int(d["timestamp"]) for d in detected], dtype=np.int64)
        # Stream readings may be any finite value; beyond ±_FRAME the frame's span would
        # overflow a float (matplotlib's transform turns singular): drawn at its edge.
        det_values = np.clip(np.asarray([float(d["value"]) for d in detected]), -_FRAME, _FRAME)
        ax.scatter(
            _dates(det_ts),
            det_values,
            marker="x",
            color="tab:orange",
            s=28,
            zorder=4,
            label=f"detected on the stream ({len(detected)})",
        )
        onsets = [d for d in detected if str(d.get("onset", "0")) in ("1", "True", "true")]
        for i, onset in enumerate(onsets[:200]):
            ax.axvline(
                _dates(np.asarray([int(onset["timestamp"])]))[0],
                color="tab:orange",
                alpha=0.5,
                linewidth=1,
                label="episode onset" if i == 0 else None,
            )
        low = min(model.lower, points.low, float(det_values.min()))
        high = max(model.upper, points.high, float(det_values.max()))
    else:
        low = min(model.lower, points.low)
        high = max(model.upper, points.high)
    if points.stream_expected.size:
        low = min(low, float(points.stream_lower.min()))
        high = max(high, float(points.stream_upper.max()))
    ax.set_title(
        f"{found.series_id} · {found.name} · μ={model.mean:.4g} σ={model.std:.4g} "
        f"k={model.sigma:g} ({model.direction}) · n={points.count:,}"
    )
    pad = 0.06 * (high - low) or 1.0
    ax.set_ylim(low - pad, high + pad)  # both bounds and every point inside the frame
    ax.margins(x=0.01)
    if as_dates:
        locator = mdates.AutoDateLocator()  # type: ignore[no-untyped-call]
        ax.xaxis.set_major_locator(locator)
        ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))  # type: ignore[no-untyped-call]
        ax.set_xlabel("time (UTC)")
    else:
        ax.set_xlabel("time (Unix seconds)")
    ax.set_ylabel("value")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", fontsize="small", framealpha=0.85)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


# The largest |value| drawn where it is (training values stay within ±1e150).
_FRAME = 1e300
# 9999-12-31T23:59:59Z, the last instant matplotlib's dates can show.
_LAST_DATE = 253_402_300_799


def _days(timestamps: Any) -> npt.NDArray[np.float64]:
    """Unix seconds as matplotlib date numbers (days since the epoch), vectorised."""
    return np.asarray(timestamps, dtype=np.float64) / 86400.0


def _seconds(timestamps: Any) -> npt.NDArray[np.float64]:
    return np.asarray(timestamps, dtype=np.float64)
