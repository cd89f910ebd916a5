"""The stream benchmark's producer, in a process of its own: ``python -m bench.live_publisher
--stream S --count N [--series M --prefix P]`` publishes the realistic mix
(``bench.streams.realistic_mix``, over M series, 1,000 by default) with the ingest
``Publisher`` at its default batch size, as a producer would while a consumer runs, and prints
``{"first_xadd": t, "last_id": id, "seconds": s}`` (``t`` wall-clock, for the drain's
first-XADD-to-last-ack time)."""

from __future__ import annotations

import argparse
import json
import sys
import time

import redis

from bench.streams import STREAM_SERIES, realistic_mix, series_ids
from detector.settings import Settings
from ingest.publisher import Publisher, checked_fields


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--stream", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--series", type=int, default=STREAM_SERIES, help="series of the mix")
    parser.add_argument("--prefix", default="stream", help="their ids: <prefix>-0000 …")
    args = parser.parse_args()
    ids = series_ids(args.series, args.prefix)
    series, timestamps, values, _ = realistic_mix(args.count, len(ids))
    # Checked before the clock starts: the benchmark times the consumer, not our validation.
    readings = [
        checked_fields(ids[s], int(t), float(v))
        for s, t, v in zip(series.tolist(), timestamps.tolist(), values.tolist(), strict=True)
    ]
    client = redis.Redis.from_url(Settings().redis_connection_url())
    try:
        with Publisher(client, stream=args.stream) as publisher:
            first = time.time()
            started = time.perf_counter()
            for fields in readings:
                publisher.publish_fields(fields)
            publisher.flush()
            seconds = time.perf_counter() - started
        last = client.xinfo_stream(args.stream)["last-generated-id"]  # ours alone write here
    finally:
        client.close()
    json.dump({"first_xadd": first, "last_id": last.decode(), "seconds": seconds}, sys.stdout)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
