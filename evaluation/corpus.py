"""Load the NAB corpus (series and labelled anomaly windows) shipped under ``bench/nab``."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
TimeArray = npt.NDArray[np.datetime64]

# The repository's own copy of the corpus (bench/nab), so nothing outside the clone is needed.
DEFAULT_NAB_ROOT = Path(__file__).resolve().parent.parent / "bench" / "nab"


@dataclass(frozen=True, slots=True)
class Series:
    """One NAB data file with its anomaly windows as inclusive row-index ranges."""

    name: str  # NAB's relative path, e.g. "realKnownCause/nyc_taxi.csv"
    timestamps: TimeArray  # datetime64[s]; a few files repeat or step back (see window_indices)
    values: FloatArray
    windows: tuple[tuple[int, int], ...]

    @property
    def folder(self) -> str:
        return self.name.split("/", 1)[0]

    @property
    def stem(self) -> str:
        return self.name.rsplit("/", 1)[-1].removesuffix(".csv")

    @property
    def seconds(self) -> npt.NDArray[np.int64]:
        """Timestamps as Unix seconds (the stream's wire format)."""
        return self.timestamps.astype("datetime64[s]").astype(np.int64)

    def __len__(self) -> int:
        return int(self.values.shape[0])

    def labels(self) -> npt.NDArray[np.int8]:
        """NAB's per-row ``label`` column: 1 inside a window, else 0."""
        out = np.zeros(len(self), dtype=np.int8)
        for start, end in self.windows:
            out[start : end + 1] = 1
        return out


@dataclass(frozen=True, slots=True)
class Corpus:
    """Every series of the benchmark, keyed by NAB relative path (sorted)."""

    series: Mapping[str, Series]

    def __iter__(self) -> Iterator[Series]:
        return iter(self.series.values())

    def __len__(self) -> int:
        return len(self.series)

    @property
    def window_count(self) -> int:
        return sum(len(s.windows) for s in self)

    @property
    def folders(self) -> list[str]:
        return sorted({s.folder for s in self})

    def subset(self, names: set[str] | list[str]) -> Corpus:
        return Corpus({n: self.series[n] for n in sorted(names)})


def read_series_csv(path: Path) -> tuple[TimeArray, FloatArray]:
    """Read a ``timestamp,value`` file (LF or CRLF) into datetime64[s] and float64 arrays."""
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = [line.split(",") for line in lines[1:] if line.strip()]
    timestamps = np.array([row[0].strip() for row in rows], dtype="datetime64[us]")
    values = np.array([float(row[1]) for row in rows], dtype=np.float64)
    return timestamps.astype("datetime64[s]"), values


def window_indices(
    timestamps: TimeArray, windows: list[list[str]], name: str
) -> tuple[tuple[int, int], ...]:
    """Map ``[start, end]`` label timestamps to row indices; like NAB, they must match rows.

    A few NAB files repeat a timestamp (daylight-saving changes) or step back once, so the
    rows are not sorted: NAB takes the first row carrying the timestamp, and so do we.
    """
    out: list[tuple[int, int]] = []
    for start, end in windows:
        bounds = np.array([start, end], dtype="datetime64[us]").astype("datetime64[s]")
        found = [np.flatnonzero(timestamps == bound) for bound in bounds]
        if any(rows.size == 0 for rows in found):
            raise ValueError(f"{name}: window [{start}, {end}] does not match its rows")
        out.append((int(found[0][0]), int(found[1][0])))
    out.sort()
    for (_, prev_end), (next_start, _) in itertools.pairwise(out):
        if next_start <= prev_end:
            raise ValueError(f"{name}: windows overlap")
    return tuple(out)


def load_corpus(root: Path = DEFAULT_NAB_ROOT) -> Corpus:
    """Load every file listed in ``labels/combined_windows.json`` from ``root/data``."""
    windows = json.loads((root / "labels" / "combined_windows.json").read_text(encoding="utf-8"))
    series: dict[str, Series] = {}
    for name in sorted(windows):
        timestamps, values = read_series_csv(root / "data" / name)
        series[name] = Series(
            name=name,
            timestamps=timestamps,
            values=values,
            windows=window_indices(timestamps, windows[name], name),
        )
    return Corpus(series)
