"""Labelled corpora shipped under ``bench/``: their series and NAB-style anomaly windows.

Two corpora, one ``Corpus`` type and one scorer (``evaluation.nab``):

- ``nab``: the Numenta Anomaly Benchmark (``bench/nab``), labelled with NAB's own windows. The
  evaluation's settings are chosen on it (in-sample, and leave-one-folder-out).
- ``skab``: the Skoltech Anomaly Benchmark (``bench/skab``), a held-out corpus of another
  source. It must NEVER be used to choose a parameter: ``Corpus.held_out`` is set on it and the
  evaluation's selection code (``evaluation.__main__``) refuses a held-out corpus. Its labelled
  ranges become windows with ``nab_windows`` (NAB's width rule, see there).
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
TimeArray = npt.NDArray[np.datetime64]

BENCH = Path(__file__).resolve().parent.parent / "bench"
# The repository's own copies of the corpora, so nothing outside the clone is needed.
DEFAULT_NAB_ROOT = BENCH / "nab"
DEFAULT_SKAB_ROOT = BENCH / "skab"
# NAB's window rule: the windows of a file take 10 % of its rows, shared among its anomalies.
WINDOW_FRACTION = 0.10


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
    """Every series of a benchmark, keyed by relative path ``<folder>/<file>`` (sorted).

    ``held_out``: the corpus only measures; nothing may be chosen on it (``require_tunable``).
    """

    series: Mapping[str, Series]
    name: str = "nab"
    held_out: bool = False

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
        return Corpus({n: self.series[n] for n in sorted(names)}, self.name, self.held_out)

    def require_tunable(self) -> None:
        """Raise unless parameters may be chosen on this corpus (a held-out one never)."""
        if self.held_out:
            raise ValueError(
                f"the {self.name} corpus is held out: no parameter may be chosen on it"
            )


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


def nab_windows(n_rows: int, labelled: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """NAB-style windows for a file of ``n_rows`` rows from labelled inclusive row ranges.

    NAB's rule for point labels: each window is ``⌊0.1·n / count⌋`` rows wide, centred on its
    label. A labelled range (a point is a range of one row) keeps its extent when it is at
    least that wide, and is otherwise widened symmetrically about its centre to that width;
    windows are clipped to the file and windows that then touch or overlap are merged.
    """
    if not labelled:
        return ()
    width = math.floor(WINDOW_FRACTION * n_rows / len(labelled))
    out: list[tuple[int, int]] = []
    for start, end in sorted(labelled):
        if not 0 <= start <= end < n_rows:
            raise ValueError(f"labelled range {(start, end)} outside rows 0..{n_rows - 1}")
        missing = width - (end - start + 1)
        if missing > 0:
            start, end = start - missing // 2, end + (missing - missing // 2)
        start, end = max(start, 0), min(end, n_rows - 1)
        if out and start <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return tuple(out)


def labelled_ranges(flags: npt.NDArray[np.float64]) -> list[tuple[int, int]]:
    """Inclusive row ranges of consecutive non-zero labels."""
    edges = np.flatnonzero(np.diff(np.concatenate(([0], (flags != 0).astype(np.int8), [0]))))
    return [(int(a), int(b) - 1) for a, b in zip(edges[::2], edges[1::2], strict=True)]


# SKAB's sensor columns; every other column is the timestamp or a label.
SKAB_LABEL_COLUMNS = ("anomaly", "changepoint")


def load_skab(root: Path = DEFAULT_SKAB_ROOT) -> Corpus:
    """Load SKAB (``root/data/<folder>/<n>.csv``, ``;``-separated, one experiment a file).

    HELD OUT: this corpus is never used to choose any parameter (see the module docstring);
    the returned corpus is marked ``held_out`` and parameter selection refuses it.

    Each sensor column of each file is its own series ``<folder>/<n>-<sensor>.csv`` (every
    sensor, none picked by looking at the labels), carrying its file's windows: the runs of
    ``anomaly = 1`` through ``nab_windows``. The ``changepoint`` column is not used; the
    anomaly-free file has no label column and no windows.
    """
    series: dict[str, Series] = {}
    for path in sorted((root / "data").glob("*/*.csv")):
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        header = [cell.strip() for cell in lines[0].split(";")]
        rows = [line.split(";") for line in lines[1:]]
        timestamps = np.array([row[0].strip() for row in rows], dtype="datetime64[s]")
        table = np.array([[float(cell) for cell in row[1:]] for row in rows], dtype=np.float64)
        columns = header[1:]
        ranges = labelled_ranges(table[:, columns.index("anomaly")]) if "anomaly" in columns else []
        windows = nab_windows(len(rows), ranges)
        for i, column in enumerate(columns):
            if column in SKAB_LABEL_COLUMNS:
                continue
            sensor = "".join(ch for ch in column if ch.isalnum())
            name = f"{path.parent.name}/{path.stem}-{sensor}.csv"
            series[name] = Series(name, timestamps, np.ascontiguousarray(table[:, i]), windows)
    if not series:
        raise ValueError(f"no SKAB data files under {root / 'data'}")
    return Corpus(dict(sorted(series.items())), name="skab", held_out=True)


def load_corpus(root: Path = DEFAULT_NAB_ROOT) -> Corpus:
    """Load every file listed in ``labels/combined_windows.json`` from ``root/data`` (NAB)."""
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
    return Corpus(series, name="nab")


# The corpora by name: the loader and its shipped root.
CORPORA: dict[str, tuple[Callable[[Path], Corpus], Path]] = {
    "nab": (load_corpus, DEFAULT_NAB_ROOT),
    "skab": (load_skab, DEFAULT_SKAB_ROOT),
}


def load_named(name: str, root: Path | None = None) -> Corpus:
    """Load a corpus by name from ``root`` (its shipped copy by default)."""
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}: one of {', '.join(CORPORA)}")
    loader, default_root = CORPORA[name]
    return loader(root or default_root)
