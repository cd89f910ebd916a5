"""The ``python -m ingest`` / ``anomaly-ingest`` command line: publish, generate, subscribe,
backfill, fit."""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import math
import random
import sys
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, TextIO

import numpy as np
import redis

from detector.backfill import MAX_INDEX, Backfill, BackfillResult
from detector.bulk_fit import BatchOutcome, BulkFit, SeriesPoints, group_columns
from detector.collector import tune_collector
from detector.errors import InvalidInputError, NotOnClusterError, StoreUnavailableError
from detector.identifiers import parse_version
from detector.settings import Settings
from detector.shards import anomalies_streams
from detector.store.connections import postgres_pool, sync_redis_client
from detector.store.connections import redis_client as async_redis_client
from detector.store.models import ModelStore
from detector.store.replication import ReplicaWait
from detector.wire.events import ANOMALY, INCIDENT, NO_DATA, decode_event
from detector.wire.readings import check_columns
from ingest.kafka import KafkaPublisher, KafkaSubscriber
from ingest.publisher import (
    InvalidReadingError,
    NotReplicatedBatchError,
    Publisher,
    UnconfirmedBatchError,
    checked_fields,
)
from ingest.subscriber import Subscriber

# Readings a series is fitted on by `generate --fit`.
FIT_POINTS = 500


class Progress:
    """A one-line progress report on stderr, refreshed at most once a second."""

    def __init__(self, label: str, unit: str = "readings") -> None:
        self.label = label
        self.unit = unit
        self.started = time.monotonic()
        self._next = self.started + 1.0
        self.shown = False

    def update(self, done: int, *, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now < self._next:
            return
        if final and not self.shown:
            return
        self._next = now + 1.0
        self.shown = True
        rate = done / max(now - self.started, 1e-9)
        end = "\n" if final else ""
        print(f"\r{self.label}: {done:,} {self.unit} ({rate:,.0f}/s)", end=end, file=sys.stderr)


def parse_timestamp(text: str) -> str:
    """Unix seconds as given, or an ISO 8601 date-time (UTC if no zone, as in NAB's files)."""
    text = text.strip()
    if text.isdigit():
        return text
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return text  # left for the reading check to refuse with the rule
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    seconds = moment.timestamp()
    return str(int(seconds)) if seconds == int(seconds) and seconds >= 0 else text


def csv_rows(stream: TextIO, series_id: str | None) -> Iterator[tuple[int, dict[str, str] | str]]:
    """(line number, entry fields or the error) per data row of a CSV with a header row
    naming ``timestamp`` and ``value`` (and optionally ``series_id``, ``version``)."""
    reader = csv.DictReader(stream)
    columns = set(reader.fieldnames or ())
    if not {"timestamp", "value"} <= columns:
        raise SystemExit("the CSV header must name the columns 'timestamp' and 'value'")
    if series_id is None and "series_id" not in columns:
        raise SystemExit("give --series-id or a 'series_id' column")
    for row in reader:
        line = reader.line_num
        try:
            yield (
                line,
                checked_fields(
                    row.get("series_id") or series_id or "",
                    parse_timestamp(row.get("timestamp") or ""),
                    (row.get("value") or "").strip(),
                    row.get("version") or None,
                ),
            )
        except InvalidReadingError as exc:
            yield line, str(exc)


# The columns of a chunk of CSV rows that passed the stream's rules: series ids, timestamps,
# values, pinned versions (None: no row pins one), and the rows refused (line, why).
Columns = tuple[list[str], list[int], list[float], list[int | None] | None, list[tuple[int, str]]]


def csv_columns(stream: TextIO, series_id: str | None, size: int) -> Iterator[Columns]:
    """``csv_rows``' rules and outcomes, by chunks of up to ``size`` rows as columns: a chunk
    is checked column-wise at once (``check_columns``), and row by row only when some row of
    it fails, to say which and why."""
    reader = csv.reader(stream)
    header = next(reader, [])
    where = {name: i for i, name in reversed(list(enumerate(header)))}
    if not {"timestamp", "value"} <= where.keys():
        raise SystemExit("the CSV header must name the columns 'timestamp' and 'value'")
    if series_id is None and "series_id" not in where:
        raise SystemExit("give --series-id or a 'series_id' column")
    at_ts, at_value = where["timestamp"], where["value"]
    at_series, at_version = where.get("series_id"), where.get("version")
    rows: list[tuple[int, str, str, str, str]] = []

    def cell(row: list[str], at: int | None) -> str:
        return row[at] if at is not None and at < len(row) else ""

    def chunk() -> Columns:
        series = [r[1] for r in rows]
        stamps = [r[2] for r in rows]
        values = [r[3] for r in rows]
        if not any(r[4] for r in rows):
            checked = check_columns(series, stamps, values)
            if checked is not None:
                return checked[0], checked[1].tolist(), checked[2].tolist(), None, []
        good: list[dict[str, str]] = []
        refused: list[tuple[int, str]] = []
        for line, s, t, v, version in rows:
            try:
                good.append(checked_fields(s, t, v, version or None))
            except InvalidReadingError as exc:
                refused.append((line, str(exc)))
        versions = [parse_version(f["version"])[0] if "version" in f else None for f in good]
        return (
            [f["series_id"] for f in good],
            [int(f["timestamp"]) for f in good],
            [float(f["value"]) for f in good],
            versions if any(versions) else None,
            refused,
        )

    for row in reader:
        if not row:  # a blank line, as DictReader skips it
            continue
        rows.append(
            (
                reader.line_num,
                cell(row, at_series) or series_id or "",
                parse_timestamp(cell(row, at_ts)),
                cell(row, at_value).strip(),
                cell(row, at_version),
            )
        )
        if len(rows) >= size:
            yield chunk()
            rows = []
    if rows:
        yield chunk()


def json_rows(stream: TextIO, series_id: str | None) -> Iterator[tuple[int, dict[str, str] | str]]:
    """(line number, entry fields or the error) per JSON line ``{"series_id", "timestamp",
    "value", "version"?}``; ``series_id`` may come from --series-id instead."""
    for line, text in enumerate(stream, start=1):
        if not text.strip():
            continue
        try:
            item = json.loads(text)
            if not isinstance(item, dict):
                raise InvalidReadingError("each line must be a JSON object")
            yield (
                line,
                checked_fields(
                    item.get("series_id") or series_id or "",
                    item.get("timestamp", ""),
                    item.get("value", ""),
                    item.get("version"),
                ),
            )
        except (ValueError, InvalidReadingError) as exc:  # JSONDecodeError is a ValueError
            yield line, str(exc)


def publish(args: argparse.Namespace, client: redis.Redis, settings: Settings) -> int:
    source = "stdin" if args.stdin else args.csv
    errors = 0
    progress = Progress(f"published from {source}")
    with _publisher(args, client, settings) as publisher:
        if args.stdin:
            rows = json_rows(sys.stdin, args.series_id)
            for line, outcome in rows:
                errors += _send(publisher, source, line, outcome)
                progress.update(publisher.sent)
        else:
            with open(args.csv, newline="", encoding="utf-8") as handle:
                for line, outcome in csv_rows(handle, args.series_id):
                    errors += _send(publisher, source, line, outcome)
                    progress.update(publisher.sent)
    progress.update(publisher.sent, final=True)
    print(f"published {publisher.sent} readings, {errors} rows refused", file=sys.stderr)
    return 1 if errors else 0


def _publisher(
    args: argparse.Namespace, client: redis.Redis, settings: Settings
) -> Publisher | KafkaPublisher:
    """The readings publisher of the chosen transport (the same interface on both)."""
    if args.transport == "kafka":
        return KafkaPublisher(
            args.kafka_bootstrap or settings.kafka_bootstrap,
            topic=args.stream or settings.kafka_readings_topic,
            batch_size=args.batch_size,
        )
    return Publisher(
        client, stream=args.stream or settings.stream_readings, maxlen=args.maxlen,
        batch_size=args.batch_size, shards=settings.stream_shards,
        wait_replicas=settings.redis_wait_replicas, wait_timeout_ms=settings.redis_wait_timeout_ms,
    )  # fmt: skip


def _send(
    publisher: Publisher | KafkaPublisher, source: str, line: int, outcome: dict[str, str] | str
) -> int:
    if isinstance(outcome, str):
        print(f"{source}:{line}: row not sent: {outcome}", file=sys.stderr)
        return 1
    publisher.publish_fields(outcome)
    return 0


def generate(args: argparse.Namespace, client: redis.Redis, settings: Settings) -> int:
    """Synthetic readings: values ~ N(100, 10); an anomaly is 5-10 σ above the mean."""
    rng = random.Random(args.seed)
    series = [f"{args.prefix}-{i}" for i in range(args.series)]
    # Each series gets one reading a second from `start`; its model is fitted on the
    # FIT_POINTS seconds just before, so plots and history show one continuous series.
    start = int(time.time())
    if args.fit:
        for series_id in series:
            _fit(args.fit, series_id, rng, end=start)
        print(f"fitted {len(series)} series through {args.fit}", file=sys.stderr)
    progress = Progress("generated")
    started = time.monotonic()
    with _publisher(args, client, settings) as publisher:
        for n in range(args.count):
            if args.rate > 0:  # pace: reading n is due at n / rate seconds
                delay = started + n / args.rate - time.monotonic()
                if delay > 0:
                    publisher.flush()
                    time.sleep(delay)
            anomalous = rng.random() < args.anomaly_ratio
            value = 100.0 + (rng.uniform(5, 10) if anomalous else rng.gauss(0, 1)) * 10.0
            series_id = series[n % len(series)]
            publisher.publish(series_id, start + n // len(series), round(value, 4))
            progress.update(publisher.sent)
    progress.update(publisher.sent, final=True)
    print(f"published {publisher.sent} readings", file=sys.stderr)
    return 0


def _fit(base_url: str, series_id: str, rng: random.Random, *, end: int) -> None:
    """Fit ``series_id`` on FIT_POINTS generated readings, one a second, ending before ``end``."""
    values = [100.0 + rng.gauss(0, 1) * 10.0 for _ in range(FIT_POINTS)]
    timestamps = list(range(end - FIT_POINTS, end))
    body = json.dumps({"timestamps": timestamps, "values": values}).encode()
    if not base_url.startswith(("http://", "https://")):
        raise SystemExit("--fit takes the API's http:// or https:// URL")
    request = urllib.request.Request(  # noqa: S310 (scheme checked above)
        f"{base_url.rstrip('/')}/fit/{series_id}",
        data=body,
        headers={"content-type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as answer:  # noqa: S310 (scheme checked above)
        answer.read()


def subscribe(args: argparse.Namespace, client: redis.Redis, settings: Settings) -> int:
    start = "0" if args.from_start else (args.from_id or "$")
    subscriber: Subscriber | KafkaSubscriber
    types = (ANOMALY,) + (NO_DATA,) * args.no_data + (INCIDENT,) * args.incidents
    if args.transport == "kafka":
        if args.from_id:
            raise SystemExit("--from takes a Redis entry id; with --transport kafka use --group")
        subscriber = KafkaSubscriber(
            args.kafka_bootstrap or settings.kafka_bootstrap,
            topic=args.stream or settings.kafka_anomalies_topic,
            from_start=args.from_start,
            series_id=args.series,
            group=args.group,
            types=types,
        )
    else:
        # Every shard's anomalies stream (one, the setting's own, when unsharded), unless
        # --stream names one.
        streams = [args.stream] if args.stream else anomalies_streams(settings)
        try:
            subscriber = Subscriber(
                client,
                streams=streams,
                start=start,
                series_id=args.series,
                group=args.group,
                consumer=args.consumer,
                types=types,
            )
        except ValueError as exc:
            raise SystemExit(f"--from: {exc}") from exc
    try:
        for event in subscriber.events(limit=args.count, idle_timeout=args.idle_timeout):
            sys.stdout.write(json.dumps(event, default=_json_default) + "\n")
            sys.stdout.flush()
    except KeyboardInterrupt:
        pass
    return 0


def backfill(args: argparse.Namespace, client: redis.Redis, settings: Settings) -> int:
    """Score a CSV history through the stream pipeline as backfill job ``--job`` (default: a
    new one): events on STREAM_BACKFILL (and with ``--events`` on stdout), progress on
    stderr. Needs Redis and PostgreSQL as the workers reach them (REDIS_*, POSTGRES_*)."""
    if args.redis_url:
        settings = settings.model_copy(update={"redis_url": args.redis_url})
    if args.stream:
        settings = settings.model_copy(update={"stream_backfill": args.stream})
    return asyncio.run(_backfill(args, settings))


async def _backfill(args: argparse.Namespace, settings: Settings) -> int:
    redis_async, pool = async_redis_client(settings), postgres_pool(settings)
    await pool.open()
    errors = scored = no_model = anomalies = episodes = 0
    try:
        job = Backfill(settings, ModelStore(redis_async, pool), args.job)
        progress = Progress(f"backfill {job.job} from {args.csv}")
        index = args.start

        def take(result: BackfillResult) -> None:
            nonlocal scored, no_model, anomalies, episodes, index
            scored += result.scored
            no_model += result.no_model
            anomalies += len(result.events)
            episodes += result.episodes_opened
            index = result.next_index
            for letter in result.dead:
                print(f"{letter.source_id}: refused: {letter.detail}", file=sys.stderr)
            if args.events:
                for fields in result.events:
                    sys.stdout.write(json.dumps(decode_event(fields), default=_json_default) + "\n")
            progress.update(index - args.start)

        # One task on the loop: reading the file between chunks keeps nothing else waiting.
        with open(args.csv, newline="", encoding="utf-8") as handle:  # noqa: ASYNC230
            for series, stamps, values, versions, refused in csv_columns(
                handle, args.series_id, settings.backfill_chunk
            ):
                for line, why in refused:
                    print(f"{args.csv}:{line}: refused: {why}", file=sys.stderr)
                errors += len(refused)
                if series:
                    take(await job.score(series, stamps, values, versions=versions, start=index))
        progress.update(index - args.start, final=True)
    finally:
        await pool.close()
        await redis_async.aclose()
    print(
        f"backfill {job.job}: {scored} readings scored, {no_model} without a model, "
        f"{anomalies} anomalies in {episodes} new episodes, {errors} rows refused; events on "
        f"{settings.stream_backfill}; next start {index}",
        file=sys.stderr,
    )
    return 1 if errors else 0


# The columns of `fit --csv`, and how long the tool waits for Redis to confirm the versions
# it stored before it exits (a put Redis missed is repaired by the readers otherwise).
FIT_COLUMNS = ("series_id", "timestamp", "value")
_SETTLE_SECONDS = 30.0


def fit(args: argparse.Namespace, client: redis.Redis, settings: Settings) -> int:
    """Bulk-fit every series of a CSV (``series_id,timestamp,value`` rows, in any order) as
    one job (``detector.bulk_fit``): the rules, versions and Redis writes of a single fit,
    refusals and progress on stderr. Needs Redis and PostgreSQL as the API reaches them."""
    if args.redis_url:
        settings = settings.model_copy(update={"redis_url": args.redis_url})
    return asyncio.run(_bulk_fit(args, settings))


async def _bulk_fit(args: argparse.Namespace, settings: Settings) -> int:
    # Options first: a bad one is refused before anything is read or connected.
    try:
        redis_async, pool = async_redis_client(settings), postgres_pool(settings)
        store = ModelStore(redis_async, pool, replica_wait=ReplicaWait.from_settings(settings))
        job = BulkFit(
            store,
            settings,
            source="cli",
            sigma=args.sigma,
            direction=args.direction,
            kind=args.kind,
        )
    except InvalidInputError as exc:
        raise SystemExit(f"anomaly-ingest fit: {exc.detail}") from None
    series = fit_csv_series(args.csv)
    progress = Progress(f"fit {args.csv}", unit="series")
    done = refused = 0

    def take(outcome: BatchOutcome) -> None:
        nonlocal done, refused
        for refusal in outcome.refused:
            print(
                f"{args.csv}: series {refusal.series_id}: refused: {refusal.detail}",
                file=sys.stderr,
            )
        done += len(outcome.stored) + len(outcome.refused)
        refused += len(outcome.refused)
        progress.update(done)

    await pool.open()
    try:
        try:
            summary = await job.run(series, take)
        except StoreUnavailableError as exc:
            progress.update(done, final=True)
            print(f"anomaly-ingest fit: {exc.detail}", file=sys.stderr)
            return 1
        progress.update(done, final=True)
        owed = await store.publisher.settle(_SETTLE_SECONDS)
    finally:
        await store.publisher.close()
        await pool.close()
        await redis_async.aclose()
    rate = summary.fitted / summary.seconds if summary.seconds > 0 else 0.0
    print(
        f"fit job {summary.job}: {summary.fitted:,} series fitted, {summary.refused:,} refused,"
        f" {summary.points:,} points in {summary.seconds:.1f} s ({rate:,.0f} series/s)"
        + (f"; Redis has not confirmed {owed} versions yet (readers repair them)" if owed else ""),
        file=sys.stderr,
    )
    return 1 if summary.refused or owed else 0


def fit_csv_series(path: str) -> Iterator[SeriesPoints]:
    """The series of a ``series_id,timestamp,value`` CSV (with a header; other columns are
    ignored), read whole with pyarrow. A file whose timestamps are not all integers or whose
    values are not all numbers is read again as text, each series' cells converted on their
    own (timestamps: Unix seconds or ISO 8601 as ``publish`` takes them), so that only the
    series holding a bad cell are refused, with the fit's own message."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    with open(path, newline="", encoding="utf-8") as handle:
        header = next(csv.reader(handle), [])
    if not set(FIT_COLUMNS) <= set(header):
        raise SystemExit(
            "the CSV header must name the columns " + ", ".join(repr(c) for c in FIT_COLUMNS)
        )
    types = {"series_id": pa.string(), "timestamp": pa.int64(), "value": pa.float64()}
    try:
        table = pacsv.read_csv(
            path,
            convert_options=pacsv.ConvertOptions(
                column_types=types, include_columns=list(FIT_COLUMNS)
            ),
        )
    except pa.ArrowInvalid:
        text = {name: pa.string() for name in FIT_COLUMNS}
        table = pacsv.read_csv(
            path,
            convert_options=pacsv.ConvertOptions(
                column_types=text, include_columns=list(FIT_COLUMNS), strings_can_be_null=False
            ),
        )
        for given in group_columns(
            table.column("series_id"),
            table.column("timestamp").to_numpy(zero_copy_only=False),
            table.column("value").to_numpy(zero_copy_only=False),
        ):
            yield SeriesPoints(
                given.series_id,
                _cells([parse_timestamp(cell) for cell in given.timestamps], np.int64),
                _cells([cell.strip() for cell in given.values], np.float64),
            )
        return
    yield from group_columns(
        table.column("series_id"),
        table.column("timestamp").to_numpy(),
        table.column("value").to_numpy(),
    )


def _cells(cells: list[str], dtype: Any) -> Any:
    """Text cells as numbers of ``dtype`` (integers: or floats, as JSON gives them), or left
    as text for the fit's rules to refuse."""
    for kind in (dtype, np.float64):
        try:
            return np.asarray(cells, dtype=kind)
        except (ValueError, OverflowError):
            continue
    return np.asarray(cells, dtype=object)


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    raise TypeError(type(value).__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anomaly-ingest", description=__doc__)
    parser.add_argument("--redis-url", help="default: from REDIS_* settings")
    parser.add_argument(
        "--stream",
        help="stream or topic name (default: from settings); with STREAM_SHARDS above 1, "
        "publish and generate send to that name's shards, subscribe reads that one stream",
    )
    parser.add_argument(
        "--transport", choices=("redis", "kafka"), default="redis", help="the bus (default redis)"
    )
    parser.add_argument("--kafka-bootstrap", help="default: KAFKA_BOOTSTRAP (kafka://host:port)")
    commands = parser.add_subparsers(dest="command", required=True)

    pub = commands.add_parser("publish", help="publish readings from a CSV file or stdin")
    source = pub.add_mutually_exclusive_group(required=True)
    source.add_argument("--csv", help="CSV with a header: timestamp,value[,series_id,version]")
    source.add_argument("--stdin", action="store_true", help="JSON lines on stdin")
    pub.add_argument("--series-id", help="series of rows that do not name one")
    _add_publish_options(pub)

    gen = commands.add_parser("generate", help="publish synthetic readings")
    gen.add_argument("--rate", type=float, default=0.0, help="readings/s (0: as fast as possible)")
    gen.add_argument("--series", type=int, default=10)
    gen.add_argument("--anomaly-ratio", type=float, default=0.01)
    gen.add_argument("--count", type=int, default=10_000)
    gen.add_argument("--prefix", default="gen", help="series ids are <prefix>-0, <prefix>-1 …")
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--fit", metavar="API_URL", help="first fit every series through the API")
    _add_publish_options(gen)

    sub = commands.add_parser("subscribe", help="print anomaly events as JSON lines")
    where = sub.add_mutually_exclusive_group()
    where.add_argument("--from-start", action="store_true")
    where.add_argument(
        "--from",
        dest="from_id",
        metavar="ID",
        help="events after this id (in every shard), or after one id a shard joined by ','",
    )
    sub.add_argument("--series", help="only this series")
    sub.add_argument(
        "--no-data",
        action="store_true",
        help="also print no_data events (a fitted series went silent, or resumed)",
    )
    sub.add_argument(
        "--incidents",
        action="store_true",
        help="also print incident events (episodes of many series opened together)",
    )
    sub.add_argument("--group", help="a consumer group of your own: durable position")
    sub.add_argument("--consumer", help="consumer name within --group")
    sub.add_argument("--count", type=int, help="exit after this many events")
    sub.add_argument("--idle-timeout", type=float, help="exit after this many quiet seconds")

    fitting = commands.add_parser(
        "fit", help="fit a new version of every series of a CSV, as one bulk fit job"
    )
    fitting.add_argument(
        "--csv", required=True, help="CSV with a header: series_id,timestamp,value (any order)"
    )
    fitting.add_argument("--kind", help="detector kind (default: DEFAULT_KIND)")
    fitting.add_argument("--sigma", type=float, help="k in μ ± kσ (default: DEFAULT_SIGMA)")
    fitting.add_argument(
        "--direction", choices=("above", "below", "both"), help="default: DEFAULT_DIRECTION"
    )

    back = commands.add_parser(
        "backfill",
        help="score a CSV history through the stream pipeline, apart from the live stream",
    )
    back.add_argument("--csv", required=True, help="CSV with a header: timestamp,value[,…]")
    back.add_argument("--series-id", help="series of rows that do not name one")
    back.add_argument("--job", help="continue this backfill job (default: a new one)")
    back.add_argument(
        "--start", type=_index, default=0, help="index of the first row in the job (below 2**53)"
    )
    back.add_argument("--events", action="store_true", help="also print the events on stdout")
    return parser


def _add_publish_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=1000, help="readings per round trip")
    parser.add_argument("--maxlen", type=int, default=None, help="MAXLEN ~ on the stream")


def _index(text: str) -> int:
    """A backfill job's reading index: an integer in [0, 2**53)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= value < MAX_INDEX:
        raise argparse.ArgumentTypeError(f"{value} is not in [0, 2**53)")
    return value


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    settings = Settings()
    tune_collector()
    if getattr(args, "maxlen", 0) is None:
        args.maxlen = settings.stream_readings_maxlen
    client = sync_redis_client(settings, args.redis_url)
    commands = {
        "publish": publish,
        "generate": generate,
        "subscribe": subscribe,
        "backfill": backfill,
        "fit": fit,
    }
    try:
        code = commands[args.command](args, client, settings)
    except NotReplicatedBatchError as exc:
        sys.exit(
            f"{exc.confirmed} readings were confirmed; the next {exc.readings} were added but "
            f"too few replicas acknowledged them: {exc.__cause__}"
        )
    except UnconfirmedBatchError as exc:
        sys.exit(
            f"lost Redis after {exc.confirmed} readings were confirmed; the next "
            f"{exc.readings} may or may not have been added: {exc.__cause__}"
        )
    except redis.exceptions.ConnectionError as exc:
        sys.exit(f"cannot reach Redis: {exc}")
    except NotOnClusterError as exc:
        sys.exit(exc.detail)
    except InvalidInputError as exc:
        sys.exit(f"refused: {exc}")
    finally:
        client.close()
    sys.exit(code)
