"""The backfill scenario: `anomaly-ingest backfill --csv` over one series' history, as a user
runs it, end to end (CSV parsing, the stream pipeline, events written, history recorded)."""

from __future__ import annotations

import csv
import subprocess
import sys
import time

import httpx
import numpy as np

from bench.context import Context
from bench.harness import ROOT, env_for
from bench.report import Row, reported
from detector.settings import Settings

START = 1_700_000_000
STEP = 60  # one reading a minute


def _history(n: int, seed: int) -> np.ndarray:
    """A daily wave with noise and a spike every 10,000 readings."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    values = 100 + 10 * np.sin(2 * np.pi * t * STEP / 86_400) + rng.normal(0, 1, n)
    values[::10_000] += 60
    return values.round(4)


def scenario_backfill(ctx: Context) -> list[Row]:
    count = 200_000 if ctx.quick else 1_000_000
    default = str(Settings.model_fields["default_kind"].default)
    rows: list[Row] = []
    for kind in sorted({default, "static"}):
        series_id = f"backfill-{kind}"
        fit_values = _history(10_080, 1)  # one week at the stream's cadence
        n_fit = len(fit_values)
        answer = httpx.post(
            f"{ctx.api_url}/fit/{series_id}",
            json={
                "timestamps": [START - STEP * (n_fit - i) for i in range(n_fit)],
                "values": fit_values.tolist(),
                "kind": kind,
            },
            timeout=120,
        )
        answer.raise_for_status()
        path = ctx.data_dir / f"backfill-{kind}.csv"
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["timestamp", "value"])
            writer.writerows(
                zip(range(START, START + STEP * count, STEP), _history(count, 2), strict=True)
            )
        started = time.perf_counter()
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "ingest",
                "backfill",
                "--csv",
                str(path),
                "--series-id",
                series_id,
            ],
            capture_output=True,
            text=True,
            env=env_for(ctx.settings),
            cwd=ROOT,
            timeout=1200,
        )
        elapsed = time.perf_counter() - started
        if done.returncode != 0 or f"{count} readings scored" not in done.stderr:
            raise RuntimeError(f"backfill failed: {done.stderr[-2000:]}")
        rate = count / elapsed
        scenario = f"backfill ({kind}): `anomaly-ingest backfill --csv`, {count:,} readings"
        rows += [
            Row(
                scenario,
                "throughput, end to end",
                rate,
                "readings/s",
                None,
                "—",
                None,
                "≥ 100,000/s",
                rate >= 100_000,
            ),
            reported(scenario, "anomaly events", _events(done.stderr), "events"),
        ]
    return rows


def _events(stderr: str) -> float:
    """The anomalies count of the command's summary line (`… N anomalies in M new …`)."""
    line = [ln for ln in stderr.splitlines() if " readings scored, " in ln][-1]
    return float(line.split(" anomalies in ")[0].rsplit(" ", 1)[-1])
