"""``make nab``: replay every NAB file through the real service (REST fit, stream, worker).

``--kind`` (default: the service's default kind, ``seasonal``) is the ``"kind"`` of every fit.
A stateful kind (``seasonal``, ``multiscale``) keeps each series' detector state in Redis and
its own grouped alerts are the episode onsets; ``--kind static`` fits the seed's μ + 3σ and
groups anomalies with the worker's episodes.

The summary puts the same kind's figures side by side: through the stream, its offline replay
(settings chosen on all of NAB: in-sample; the per-file outputs must be identical to the
stream's), leave-one-folder-out on NAB, and the held-out second corpus (scored, never tuned on).
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import redis

from bench.harness import ROOT, api_process, embedded_servers, env_for
from detector.kinds.registry import KINDS
from detector.settings import Settings
from evaluation.__main__ import (
    FLAG_THRESHOLD,
    HELD_OUT_CORPUS,
    SCOREBOARD,
    Params,
    format_columns,
    format_table,
    lofo,
    run_detector,
    score_profiles,
)
from evaluation.corpus import DEFAULT_NAB_ROOT, Series, load_corpus, load_named
from evaluation.nab import PROFILES, CorpusScore, NabScorer, probationary_length
from evaluation.replay import DAY, stream_rows
from evaluation.results import results_path, write_results
from ingest.publisher import Publisher

DEFAULT_RESULTS = ROOT / "bench" / "results" / "nab"
log = logging.getLogger("bench.nab")


DEFAULT_KIND = str(Settings.model_fields["default_kind"].default)


def series_id(series: Series) -> str:
    """A valid series id per file: ``<folder>:<file stem>``."""
    return f"{series.folder}:{series.stem}"


def split(series: Series) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any], int]:
    """Rows kept (first of each timestamp) and the probationary length in original rows."""
    seconds = series.seconds
    return seconds, stream_rows(seconds), probationary_length(len(series))


def replay(settings: Settings, api_url: str, corpus: Any, fit_extra: dict[str, Any]) -> float:
    """Fit every file's probationary period over REST, publish the rest, drain one worker;
    returns the seconds the worker took."""
    with httpx.Client(base_url=api_url, timeout=120) as http:
        for series in corpus:
            seconds, keep, probation = split(series)
            rows = np.flatnonzero(keep[:probation])
            body = {
                "timestamps": seconds[rows].tolist(),
                "values": series.values[rows].tolist(),
                **fit_extra,
            }
            answer = http.post(f"/fit/{series_id(series)}", json=body)
            if answer.status_code == 422:  # e.g. a constant probationary period: no model,
                # so its readings are counted and acknowledged without events (as for users)
                log.warning("%s not fitted: %s", series.name, answer.json()["detail"])
                continue
            answer.raise_for_status()
    client = redis.Redis.from_url(settings.redis_connection_url())
    with Publisher(client, stream=settings.stream_readings, batch_size=5000) as publisher:
        for series in corpus:
            seconds, keep, probation = split(series)
            sid = series_id(series)
            for i in np.flatnonzero(keep[probation:]) + probation:
                publisher.publish(sid, int(seconds[i]), float(series.values[i]))
    client.close()
    started = time.perf_counter()
    worker = subprocess.run(
        [sys.executable, "-m", "detector", "--burst", "--consumer", "nab"],
        env=env_for(settings) | _settings_env(settings),
        cwd=ROOT,
        check=True,
    )
    assert worker.returncode == 0
    return time.perf_counter() - started


def _settings_env(settings: Settings) -> dict[str, str]:
    return {
        "METRICS_PORT": "0",
        "EPISODES": "true",
        "EPISODE_QUIET_SECONDS": str(settings.episode_quiet_seconds),
    }


def onsets(settings: Settings) -> dict[str, set[int]]:
    """Episode onsets from the `anomalies` stream: series id → reading timestamps."""
    client = redis.Redis.from_url(settings.redis_connection_url(), decode_responses=True)
    found: dict[str, set[int]] = {}
    start = "-"
    while True:
        chunk: Any = client.xrange(settings.stream_anomalies, min=start, count=10_000)
        for entry_id, fields in chunk:
            if fields.get("onset") == "1":
                found.setdefault(fields["series_id"], set()).add(int(fields["timestamp"]))
            start = f"({entry_id}"
        if len(chunk) < 10_000:
            break
    client.close()
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.nab_stream", description=__doc__)
    parser.add_argument("--nab-root", type=Path, default=DEFAULT_NAB_ROOT)
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    parser.add_argument(
        "--name",
        help="results folder under --results (default: stream, or stream-<kind>)",
    )
    parser.add_argument(
        "--kind",
        choices=sorted(KINDS),
        default=DEFAULT_KIND,
        help=f'the "kind" of every fit (default {DEFAULT_KIND}, the service\'s default)',
    )
    parser.add_argument("--jobs", type=int, default=2, help="processes for the offline figures")
    parser.add_argument(
        "--quiet-seconds",
        type=int,
        default=Settings().episode_quiet_seconds,
        help="EPISODE_QUIET_SECONDS for the worker (the service default unless set)",
    )
    args = parser.parse_args(argv)
    name = args.name or ("stream" if args.kind == "static" else f"stream-{args.kind}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    corpus = load_corpus(args.nab_root)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="nab-") as tmp:
        with (
            embedded_servers(Path(tmp), episode_quiet_seconds=args.quiet_seconds) as servers,
            api_process(servers.settings, ["-m", "api", "--log-level", "warning"]) as api,
        ):
            settings = servers.settings
            worker_seconds = replay(settings, api.url, corpus, {"kind": args.kind})
            found = onsets(settings)
    outputs = {}
    for series in corpus:
        seconds, keep, _ = split(series)
        flagged = np.isin(seconds, sorted(found.get(series_id(series), ()))) & keep
        outputs[series.name] = flagged.astype(np.float64)
        write_results(results_path(args.results, name, series.name), series, outputs[series.name])
    scorer = NabScorer(corpus)
    results: dict[str, CorpusScore] = {
        p.name: scorer.score(outputs, p, FLAG_THRESHOLD) for p in PROFILES.values()
    }
    if args.kind == "static":
        quiet = f"quiet {args.quiet_seconds} s"
        label = f"static μ+3σ, episodes ({quiet}), through the stream"
        offline_label, offline_kind = f"static μ+3σ, episodes ({quiet}), offline", "static-episodes"
        params = Params(quiet_days=args.quiet_seconds / DAY)
    else:  # a registered kind replays offline through its own entry of the kind table
        label = f"{args.kind} (ours), through the stream"
        offline_label, offline_kind = f"{args.kind} (ours), offline replay", args.kind
        params = Params()
    offline = run_detector(corpus, offline_kind, params)
    in_sample = score_profiles(scorer, offline)
    rows: list[tuple[str, dict[str, CorpusScore] | float]] = [
        (label, results),
        (offline_label, in_sample),
    ]
    rows.extend((f"{n} (published)", v) for n, v in SCOREBOARD)
    print(format_table(rows))
    # The identity check: the stream's per-file alerts are the offline replay's.
    differ = [n for n in outputs if not np.array_equal(outputs[n], offline[n])]
    print(
        f"\nstream vs offline replay: {len(corpus) - len(differ)} of {len(corpus)} files"
        f" identical{'' if not differ else '; differ: ' + ', '.join(differ[:5])}"
    )
    held_out = load_named(HELD_OUT_CORPUS)  # scored only: it never chooses a parameter
    held_scores = score_profiles(NabScorer(held_out), run_detector(held_out, offline_kind, params))
    held = lofo(corpus, args.nab_root, offline_kind, args.jobs)
    lofo_scores = None if held is None else score_profiles(scorer, held[0])
    print()
    print(
        format_columns(
            [
                "NAB stream",
                "NAB in-sample",
                "NAB leave-1-folder-out",
                f"{HELD_OUT_CORPUS.upper()} held out",
            ],
            [(offline_kind, [results, in_sample, lofo_scores, held_scores])],
        )
    )
    readings = sum(len(s) for s in corpus)
    print(
        f"\n{len(corpus)} files, {readings} rows: fit over REST, published to `readings`, "
        f"drained by one worker in {worker_seconds:.1f} s; {sum(map(len, found.values()))} "
        f"episode onsets; {time.perf_counter() - started:.0f} s in all."
    )
    print(f"NAB-format outputs: {args.results / name}/<folder>/{name}_<file>.csv")
    # The stream must give the offline replay's alerts, file by file: else the run fails.
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
