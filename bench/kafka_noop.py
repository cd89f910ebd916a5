"""The Kafka baseline: ``python -m bench.kafka_noop --bootstrap H:P --topic T --group G
--count N`` reads N records of a topic as one member of its own consumer group with plain
aiokafka (batches of the worker's ``kafka_batch_count``), commits the offsets after each batch
and does nothing else, then prints ``{"entries": n, "seconds": s}``, timed from the first
batch on, as the faust worker's figure is: the floor a consumer in Python pays for the
transport alone."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

from aiokafka import AIOKafkaConsumer

from detector.settings import Settings


async def drain(bootstrap: str, topic: str, group: str, count: int) -> dict[str, float]:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    batch = Settings().kafka_batch_count
    done, first, started = 0, 0, 0.0
    try:
        while done < count:
            found = await consumer.getmany(timeout_ms=1000, max_records=batch)
            got = sum(len(records) for records in found.values())
            if not got:
                continue
            await consumer.commit()
            if not done:
                started, first = time.perf_counter(), got
            done += got
    finally:
        await consumer.stop()
    return {"entries": done - first, "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--count", type=int, required=True)
    args = parser.parse_args()
    result = asyncio.run(drain(args.bootstrap, args.topic, args.group, args.count))
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
