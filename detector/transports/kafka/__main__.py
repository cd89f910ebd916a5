"""Run the faust worker: ``python -m detector.transports.kafka worker`` (faust's own CLI)."""

from __future__ import annotations

import sys

from prometheus_client import CollectorRegistry

from detector.collector import tune_collector
from detector.errors import NotOnClusterError
from detector.metrics import WorkerMetrics
from detector.settings import Settings
from detector.store.connections import refuse_unsharded_cluster
from detector.transports.kafka.app import create_app


def main() -> None:
    metrics = WorkerMetrics(CollectorRegistry(), transport="kafka")
    args = sys.argv[1:]
    # faust's CLI turns its web server (port 6066) on unless told; metrics have their own port,
    # and two workers on one host would fight over 6066.
    if args[:1] == ["worker"] and not any(a.startswith("--with") for a in args):
        sys.argv.insert(2, "--without-web")
    settings = Settings()
    try:
        refuse_unsharded_cluster(settings, "the Kafka worker")
    except NotOnClusterError as exc:
        sys.exit(exc.detail)
    tune_collector()
    create_app(settings, metrics).main()


if __name__ == "__main__":
    main()
