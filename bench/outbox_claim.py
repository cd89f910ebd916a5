"""The MLflow outbox's claim while MLflow is down: ``python -m bench.outbox_claim [S] [V]``.

Every series' oldest row has failed and waits for its next try, so no row can be claimed; the
figure is how long one claim takes to find that out, against the claim query the service used
before (a per-row "no earlier version waiting" anti-join) in the same database.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import psycopg

from bench.harness import embedded_servers
from detector.mlflow_outbox import _CLAIM

_ANTI_JOIN_CLAIM = """
SELECT o.model_id FROM mlflow_outbox o JOIN model_versions m ON m.id = o.model_id
WHERE o.next_try <= now()
  AND NOT EXISTS (
      SELECT 1 FROM mlflow_outbox eo JOIN model_versions em ON em.id = eo.model_id
      WHERE em.series_id = m.series_id AND em.version < m.version)
ORDER BY o.model_id LIMIT 1 FOR UPDATE OF o SKIP LOCKED
"""


def fill(conn: psycopg.Connection, series: int, versions: int) -> None:
    conn.execute(
        "INSERT INTO series (series_id, last_version) "
        "SELECT 'outbox-' || s, %s FROM generate_series(1, %s) s",
        (versions, series),
    )
    conn.execute(
        """
        INSERT INTO model_versions (series_id, version, mean, std, sigma, direction,
            points_used, first_ts, last_ts, min_value, max_value)
        SELECT 'outbox-' || s, v, 0, 1, 3, 'above', 10, 0, 9, 0, 1
        FROM generate_series(1, %s) s, generate_series(1, %s) v
        """,
        (series, versions),
    )
    # MLflow down: each series' first version failed and waits an hour; the rest queue behind.
    conn.execute(
        """
        INSERT INTO mlflow_outbox (model_id, series_id, version, attempts, next_try)
        SELECT id, series_id, version, CASE WHEN version = 1 THEN 3 ELSE 0 END,
               CASE WHEN version = 1 THEN now() + interval '1 hour' ELSE now() END
        FROM model_versions WHERE series_id LIKE 'outbox-%%'
        """
    )
    conn.execute("ANALYZE")


def timed(conn: psycopg.Connection, sql: str, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        with conn.transaction():
            started = time.perf_counter()
            found = conn.execute(sql).fetchall()
            best = min(best, time.perf_counter() - started)
        assert found == [], "a blocked series' later version was claimed"
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("series", nargs="?", type=int, default=1000)
    parser.add_argument("versions", nargs="?", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-outbox-") as tmp:
        with embedded_servers(Path(tmp), durable=False) as servers:
            with psycopg.connect(servers.settings.postgres_conninfo(), autocommit=True) as conn:
                fill(conn, args.series, args.versions)
                now, before = timed(conn, _CLAIM), timed(conn, _ANTI_JOIN_CLAIM)
    rows = args.series * args.versions
    print(f"{rows:,} outbox rows over {args.series:,} series, every series blocked:")
    print(f"  claim (index on series, version): {now * 1000:9.1f} ms")
    print(f"  claim (per-row anti-join, before): {before * 1000:9.1f} ms  ({before / now:.0f}×)")


if __name__ == "__main__":
    main()
