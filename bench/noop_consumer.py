"""The stream baseline: a consumer that only XREADGROUPs and XACKs, with the worker's client.

It reads ``--count`` entries of a stream in batches of ``--batch`` (the worker's setting) with
the same client the worker uses (redis.asyncio, hiredis, decoded replies) and acknowledges each
batch with one XACK, then prints ``{"entries": n, "seconds": s}``: the floor any consumer in
Python pays for the transport alone. With ``--block`` it waits for entries as the worker does
on a stream being published, until ``--count`` have come.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

from detector.settings import Settings
from detector.store.connections import redis_client


async def drain(
    settings: Settings, count: int, consumer: str, block: int | None = None
) -> dict[str, float]:
    client = redis_client(settings)
    stream, group = settings.stream_readings, settings.stream_group
    done = 0
    started = time.perf_counter()
    try:
        while done < count:
            reply: Any = await client.xreadgroup(
                group, consumer, {stream: ">"}, count=settings.stream_batch_count, block=block
            )
            if not reply:
                if block is not None:
                    continue  # a live stream: wait for more
                break
            entries = reply[stream][0] if isinstance(reply, dict) else reply[0][1]
            await client.xack(stream, group, *(entry_id for entry_id, _ in entries))
            done += len(entries)
    finally:
        await client.aclose()
    return {"entries": done, "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--consumer", default="noop")
    parser.add_argument(
        "--block", type=int, help="wait up to BLOCK ms for entries (a stream being published)"
    )
    args = parser.parse_args()
    result = asyncio.run(drain(Settings(), args.count, args.consumer, args.block))
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
