"""The faust baseline: ``python -m bench.faust_noop --bootstrap H:P --topic T --group G
--count N`` runs a faust app whose one agent takes the topic in ``take_events`` batches of the
worker's ``kafka_batch_count`` (within ``kafka_batch_within_seconds``), as the detector's agent
does, and does nothing else with them; faust acknowledges and commits as for the detector. It
prints ``{"entries": n, "seconds": s}`` timed from the first batch on, then exits: the floor a
faust agent pays for faust's per-record delivery alone."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import cast

import faust

from detector.settings import Settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--count", type=int, required=True)
    args = parser.parse_args()
    settings = Settings()
    app = faust.App(
        args.group,
        broker=f"kafka://{args.bootstrap}",
        store="memory://",
        autodiscover=False,
        web_enabled=False,
        datadir=str(Path(tempfile.mkdtemp(prefix="faust-noop-"))),
        topic_disable_leader=True,
        consumer_auto_offset_reset="earliest",
    )
    topic = app.topic(
        args.topic, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"
    )
    seen = {"done": 0, "first": 0, "started": 0.0}

    @app.agent(topic, name="noop")
    async def noop(stream: faust.StreamT[bytes]) -> None:
        async for batch in cast(faust.Stream[bytes], stream).take_events(
            settings.kafka_batch_count, within=settings.kafka_batch_within_seconds
        ):
            if not seen["done"]:
                seen["started"], seen["first"] = time.perf_counter(), len(batch)
            seen["done"] += len(batch)
            if seen["done"] >= args.count:
                elapsed = time.perf_counter() - seen["started"]
                result = {"entries": seen["done"] - seen["first"], "seconds": elapsed}
                # faust's worker redirects sys.stdout to its logger: write to the descriptor.
                os.write(1, (json.dumps(result) + "\n").encode())
                os._exit(0)  # faust's shutdown takes seconds; the figure is taken

    sys.argv = [sys.argv[0], "worker", "-l", "warn", "--without-web"]
    app.main()


if __name__ == "__main__":
    main()
