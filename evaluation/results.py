"""NAB-format per-file result CSVs: write a detector's output, read one back for scoring."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from evaluation.corpus import Corpus, Series

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class ResultsFile:
    """The columns of a NAB result file that scoring needs."""

    timestamps: npt.NDArray[np.datetime64]
    anomaly_scores: FloatArray
    labels: npt.NDArray[np.int8]


def results_path(root: Path, detector: str, series_name: str) -> Path:
    """NAB's layout: ``<root>/<detector>/<folder>/<detector>_<file>.csv``."""
    folder, file_name = series_name.split("/", 1)
    return root / detector / folder / f"{detector}_{file_name}"


def write_results(
    path: Path,
    series: Series,
    anomaly_scores: FloatArray,
    extra: Mapping[str, FloatArray] | None = None,
) -> None:
    """Write ``timestamp,value,anomaly_score,label`` (+ ``extra`` columns, e.g. NAB's
    ``S(t)_standard``), one row per row of ``series``."""
    anomaly_scores = np.asarray(anomaly_scores, dtype=np.float64)
    if anomaly_scores.shape != series.values.shape:
        raise ValueError(f"{series.name}: {anomaly_scores.size} scores for {len(series)} rows")
    extra = dict(extra or {})
    columns = ["timestamp", "value", "anomaly_score", "label", *extra]
    stamps = np.datetime_as_string(series.timestamps, unit="s")
    labels = series.labels()
    lines = [",".join(columns)]
    for i in range(len(series)):
        cells = [
            stamps[i].replace("T", " "),
            repr(float(series.values[i])),
            repr(float(anomaly_scores[i])),
            str(int(labels[i])),
        ]
        cells.extend(repr(float(column[i])) for column in extra.values())
        lines.append(",".join(cells))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def read_results(path: Path) -> ResultsFile:
    """Read a NAB result file by column name (NAB's own have more columns, in any order)."""
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    header = lines[0].split(",")
    try:
        ts_col, score_col = header.index("timestamp"), header.index("anomaly_score")
    except ValueError:
        raise ValueError(f"{path}: needs timestamp and anomaly_score columns") from None
    label_col = header.index("label") if "label" in header else None
    rows = [line.split(",") for line in lines[1:]]
    return ResultsFile(
        timestamps=np.array([r[ts_col] for r in rows], dtype="datetime64[us]").astype(
            "datetime64[s]"
        ),
        anomaly_scores=np.array([float(r[score_col]) for r in rows], dtype=np.float64),
        labels=np.array(
            [int(float(r[label_col])) if label_col is not None else 0 for r in rows],
            dtype=np.int8,
        ),
    )


def read_results_dir(root: Path, detector: str, corpus: Corpus) -> dict[str, FloatArray]:
    """Anomaly scores of every corpus file from ``root/<detector>/…``, checked row by row
    against the data so a stale or truncated file cannot be scored silently."""
    out: dict[str, FloatArray] = {}
    for series in corpus:
        result = read_results(results_path(root, detector, series.name))
        if result.timestamps.shape != series.timestamps.shape or np.any(
            result.timestamps != series.timestamps
        ):
            raise ValueError(f"{series.name}: result rows do not match the data file's rows")
        out[series.name] = result.anomaly_scores
    return out
