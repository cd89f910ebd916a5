"""`python -m bench`: start the service on the embedded default, run every scenario beside its
baseline in the same run, print one table and write bench/results/bench.json (after each
scenario, so a long run keeps what it measured; a scenario that fails is logged and the
others still run, and the run exits with status 1)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from bench.context import Context
from bench.harness import ROOT, api_process, embedded_servers
from bench.report import Row, print_table
from bench.scenarios import SCENARIOS

log = logging.getLogger("bench")


def run(names: list[str], *, quick: bool, out: Path | None = None) -> tuple[list[Row], list[str]]:
    """Start the servers and the bench API, run the scenarios ``names`` in order, stop all.
    Returns the rows and the names of the scenarios that failed; the rows so far are written
    to ``out`` after each scenario."""
    rows: list[Row] = []
    failed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        data_dir = Path(tmp)
        with (
            embedded_servers(data_dir) as servers,
            api_process(servers.settings, ["-m", "bench.app"]) as api,
        ):
            settings = servers.settings
            ctx = Context(
                settings,
                api.url,
                api.port,
                api.pid,
                servers.redis_admin_url,  # the scenarios read INFO, an admin command
                settings.postgres_conninfo(),
                data_dir,
                quick,
            )
            for name in names:
                log.info("scenario %s", name)
                try:
                    rows.extend(SCENARIOS[name](ctx))
                except Exception:  # reported, and the other scenarios still measured
                    log.exception("scenario %s failed", name)
                    failed.append(name)
                if out is not None:
                    _write(out, rows)
    return rows, failed


def _write(out: Path, rows: list[Row]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps([asdict(r) for r in rows], indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", nargs="*", choices=list(SCENARIOS), help="scenarios to run")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "bench.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not one line per request

    out = Path(args.out)
    rows, failed = run(args.only or list(SCENARIOS), quick=args.quick, out=out)

    print()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    )
    print_table(rows)
    _write(out, rows)
    print(f"\nwritten to {out}")
    if failed:
        print(f"failed scenarios (see the log above): {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
