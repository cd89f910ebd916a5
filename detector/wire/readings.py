"""The `readings` wire format: validating readings and writing dead letters (flat string fields)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from operator import itemgetter
from typing import Final, Literal, cast, get_args

import numpy as np
import numpy.typing as npt

from detector.errors import InvalidSeriesError, InvalidVersionError
from detector.identifiers import parse_version, validate_series_id
from detector.kinds.training import MAX_TIMESTAMP
from detector.wire.events import number

DeadReason = Literal[
    "bad_encoding",
    "missing_field",
    "bad_series_id",
    "bad_value",
    "bad_timestamp",
    "bad_version",
    "unknown_version",
    "too_many_deliveries",
    "processing_failed",
]
DEAD_REASONS: Final[tuple[str, ...]] = get_args(DeadReason)

READING_FIELDS: Final = ("series_id", "timestamp", "value")
_DEAD_OWN_FIELDS: Final = frozenset({"source_id", "reason", "detail"})

# Same rule as the REST predict body: decimal digits only, so "1.5", "-1" and " 1" are refused.
_TIMESTAMP: Final = re.compile(r"[0-9]{1,19}")
# A value: a decimal number in ASCII, as JSON, C's strtod and every language's float parser
# read it (Python's float() alone also takes whitespace, "1_000" and other scripts' digits).
_NUMBER: Final = r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
_VALUE: Final = re.compile(_NUMBER)


@dataclass(frozen=True, slots=True)
class Reading:
    """A validated reading; ``version`` is a pinned major version, None for the latest."""

    source_id: str
    series_id: str
    timestamp: int
    value: float
    version: int | None = None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A `readings` entry that cannot be scored, and why."""

    source_id: str
    reason: DeadReason
    detail: str
    fields: Mapping[str, str]

    def to_fields(self) -> dict[str, str]:
        """`readings:dead` entry: source_id, reason, detail, then the original fields (a name
        that clashes with ours is kept as ``original:<name>``)."""
        out = {"source_id": self.source_id, "reason": self.reason, "detail": self.detail}
        for name, value in self.fields.items():
            out[f"original:{name}" if name in _DEAD_OWN_FIELDS else name] = value
        return out


def parse_reading(source_id: str, fields: Mapping[str, str]) -> Reading | DeadLetter:
    """Validate one `readings` entry's fields; never raises on bad input."""

    def dead(reason: DeadReason, detail: str) -> DeadLetter:
        return DeadLetter(source_id, reason, detail, dict(fields))

    missing = [name for name in READING_FIELDS if not fields.get(name)]
    if missing:
        return dead("missing_field", f"missing field(s): {', '.join(missing)}")
    series_id = fields["series_id"]
    try:
        validate_series_id(series_id)
    except InvalidSeriesError as exc:
        return dead("bad_series_id", exc.detail)
    raw_ts = fields["timestamp"]
    if _TIMESTAMP.fullmatch(raw_ts) is None or int(raw_ts) > MAX_TIMESTAMP:
        return dead("bad_timestamp", "timestamp must be a non-negative integer (Unix seconds)")
    raw_value = fields["value"]
    value = float(raw_value) if _VALUE.fullmatch(raw_value) else math.nan
    if not math.isfinite(value):
        return dead("bad_value", "value must be a finite number")
    version: int | None = None
    raw_version = fields.get("version")
    if raw_version:  # an empty `version` means the latest, as `?version=` does over REST
        try:
            major, minor, patch = parse_version(raw_version)
        except InvalidVersionError as exc:
            return dead("bad_version", exc.detail)
        if (minor, patch) != (0, 0):  # well-formed, but only X.0.0 versions are ever made
            return dead("unknown_version", f"no version {raw_version} for series '{series_id}'")
        version = major
    return Reading(source_id, series_id, int(raw_ts), value, version)


# A `readings` entry as Redis sends it: the id and its flat field list [name, value, ...],
# bytes as they were written (str from transports that decoded already, such as Kafka's JSON);
# None or empty when the entry was deleted while pending.
RawEntry = tuple[str, Sequence[str | bytes] | None]

# The whole batch's unique series ids, newline-joined, checked in one regex pass.
_SERIES_IDS_JOINED: Final = re.compile(r"(?:[A-Za-z0-9_.:\-]{1,128}\n)+")
_SERIES_IDS_JOINED_BYTES: Final = re.compile(_SERIES_IDS_JOINED.pattern.encode())
# A character no decimal number has: over the others float() takes exactly what _VALUE does
# (it refuses "1e", "." and "--1" itself), so a batch's values are checked in one C pass.
_NOT_IN_NUMBERS: Final = re.compile(r"[^0-9+\-.eE]")
_NOT_IN_NUMBERS_BYTES: Final = re.compile(_NOT_IN_NUMBERS.pattern.encode())
_LAYOUT: Final = ("series_id", "timestamp", "value")
_LAYOUT_BYTES: Final = tuple(name.encode() for name in _LAYOUT)


@dataclass(slots=True)
class ReadingBatch:
    """Validated readings as columns (one row per reading), for scoring a batch at once.

    ``versions`` is None when no reading pins a version (the common case), else one entry per
    row (None: the latest).
    """

    source_ids: list[str]
    series_ids: list[str]
    timestamps: npt.NDArray[np.int64]
    values: npt.NDArray[np.float64]
    versions: list[int | None] | None = None

    def __len__(self) -> int:
        return len(self.source_ids)

    def reading(self, row: int) -> Reading:
        version = None if self.versions is None else self.versions[row]
        return Reading(
            self.source_ids[row],
            self.series_ids[row],
            int(self.timestamps[row]),
            float(self.values[row]),
            version,
        )

    @classmethod
    def from_readings(cls, readings: Sequence[Reading]) -> ReadingBatch:
        n = len(readings)
        versions = [r.version for r in readings]
        return cls(
            [r.source_id for r in readings],
            [r.series_id for r in readings],
            np.fromiter((r.timestamp for r in readings), dtype=np.int64, count=n),
            np.fromiter((r.value for r in readings), dtype=np.float64, count=n),
            None if all(v is None for v in versions) else versions,
        )


def _text(part: str | bytes) -> str:
    """A field as text, invalid UTF-8 escaped as ``\\xNN`` (never raises)."""
    return part if isinstance(part, str) else part.decode("utf-8", "backslashreplace")


def as_fields(flat: Sequence[str | bytes] | None) -> dict[str, str]:
    """A raw entry's fields as text for a dead letter; never raises, loses nothing.

    Bytes that are not UTF-8 are escaped with ``backslashreplace`` (``b"1\\xff"`` becomes the
    text ``1\\xff``); a name that repeats keeps its first value, later ones are kept as
    ``<name>#2``, ``<name>#3`` …; a name left without a value (an odd list) gets "".
    """
    out: dict[str, str] = {}
    if not flat:
        return out
    texts = [_text(part) for part in flat]
    if len(texts) % 2:
        texts.append("")
    for name, value in zip(texts[0::2], texts[1::2], strict=True):
        key, n = name, 1
        while key in out:
            n += 1
            key = f"{name}#{n}"
        out[key] = value
    return out


def decode_entry(source_id: str, flat: Sequence[str | bytes]) -> dict[str, str] | DeadLetter:
    """A raw entry's fields as a mapping of text, or a `bad_encoding` dead letter when a name
    or value is not UTF-8, a name repeats (which value would count?) or the list is odd.

    The dead letter keeps the original fields as ``as_fields`` shows them (invalid bytes
    escaped with ``backslashreplace``).
    """
    try:
        texts = [part if isinstance(part, str) else part.decode() for part in flat]
    except UnicodeDecodeError:
        bad = [
            f"name '{_text(part)}'" if n % 2 == 0 else f"value of '{_text(flat[n - 1])}'"
            for n, part in enumerate(flat)
            if isinstance(part, bytes) and not _is_utf8(part)
        ]
        detail = f"not UTF-8 (shown with \\x escapes): {', '.join(bad)}"
        return DeadLetter(source_id, "bad_encoding", detail, as_fields(flat))
    names = texts[0::2]
    if len(texts) % 2:
        detail = f"field '{names[-1]}' has no value"
        return DeadLetter(source_id, "bad_encoding", detail, as_fields(flat))
    if len(set(names)) != len(names):
        repeated = sorted({name for name in names if names.count(name) > 1})
        detail = f"repeated field name(s): {', '.join(repeated)}"
        return DeadLetter(source_id, "bad_encoding", detail, as_fields(flat))
    return dict(zip(names, texts[1::2], strict=True))


def _is_utf8(part: bytes) -> bool:
    try:
        part.decode()
    except UnicodeDecodeError:
        return False
    return True


def flat_fields(fields: Mapping[str, str] | None) -> list[str] | None:
    """Fields as redis-py parses them (a mapping) in the raw flat form."""
    if not fields:
        return None
    return [item for pair in fields.items() for item in pair]


def parse_batch(entries: Sequence[RawEntry]) -> tuple[ReadingBatch, list[DeadLetter]]:
    """Validate a batch of raw entries with the rules of ``parse_reading``, vectorised.

    Entries laid out as producers write them (exactly ``series_id``, ``timestamp``, ``value``,
    in that order) are checked column-wise: one regex pass over the batch's distinct series
    ids, one ``isdigit`` over the joined timestamps, ``float`` mapped over the values. Bytes
    are checked as they came: every rule passes ASCII only, so a batch that passes needs no
    UTF-8 decoding beyond its distinct series ids. If any of them fails, or an entry has
    another layout (a ``version``, extra fields), those entries are decoded one by one
    (``decode_entry``: not UTF-8 → `bad_encoding`) and go through ``parse_reading``, so the
    outcome is always the same as its. Deleted entries (no fields) are left out: the caller
    acknowledges them.
    """
    layout: tuple[str, ...] | tuple[bytes, ...] = _LAYOUT
    for _, fields in entries:
        if fields:
            layout = _LAYOUT_BYTES if isinstance(fields[0], bytes) else _LAYOUT
            break
    sid, ts_name, value_name = layout
    common = _common_columns(entries, layout)
    if common is not None:  # every entry in the common layout: sliced out, no loop here
        ids, series, stamps, values = common
        others: list[tuple[str, Sequence[str | bytes]]] = []
    else:
        ids, series, stamps, values, others = [], [], [], [], []
        for entry_id, fields in entries:
            if not fields:
                continue
            if (
                len(fields) == 6
                and fields[0] == sid
                and fields[2] == ts_name
                and fields[4] == value_name
            ):
                ids.append(entry_id)
                series.append(fields[1])
                stamps.append(fields[3])
                values.append(fields[5])
            else:
                others.append((entry_id, fields))
    columns = _columns(series, stamps, values) if ids else None
    if columns is None:  # something in the common layout is invalid: decide one by one
        others = [
            (i, [sid, s, ts_name, t, value_name, v])
            for i, s, t, v in zip(ids, series, stamps, values, strict=True)
        ] + others
        ids = []
        columns = ([], np.empty(0, np.int64), np.empty(0, np.float64))
    batch = ReadingBatch(ids, *columns)
    if not others:
        return batch, []
    dead: list[DeadLetter] = []
    readings: list[Reading] = []
    for entry_id, fields in others:
        decoded = decode_entry(entry_id, fields)
        parsed = decoded if isinstance(decoded, DeadLetter) else parse_reading(entry_id, decoded)
        if isinstance(parsed, DeadLetter):
            dead.append(parsed)
        else:
            readings.append(parsed)
    if readings:
        batch = _concat(batch, ReadingBatch.from_readings(readings))
    return batch, dead


def check_columns(
    series_ids: list[str], timestamps: list[str], values: list[str]
) -> tuple[list[str], npt.NDArray[np.int64], npt.NDArray[np.float64]] | None:
    """``parse_reading``'s rules over whole columns of text at once (what ``parse_batch`` does
    for a batch in the common layout): the columns of a ``ReadingBatch`` when every row
    passes, else None (check the rows one by one to learn which fails, and why)."""
    if not series_ids:
        return [], np.empty(0, np.int64), np.empty(0, np.float64)
    return _columns(list(series_ids), list(timestamps), list(values))


def _common_columns(
    entries: Sequence[RawEntry], layout: tuple[str, ...] | tuple[bytes, ...]
) -> tuple[list[str], list[str | bytes], list[str | bytes], list[str | bytes]] | None:
    """Ids, series ids, timestamps and values when every entry has exactly the common layout
    (six fields, ``layout``'s names at 0, 2, 4), cut from the batch's fields joined in one list
    with C-level slices; None otherwise (a deleted entry, another layout), for the loop."""
    n = len(entries)
    lists = list(map(itemgetter(1), entries))
    try:
        lengths = set(map(len, lists))
    except TypeError:  # a deleted entry (None)
        return None
    if n == 0 or lengths != {6}:
        return None
    flat: list[str | bytes] = list(chain.from_iterable(lists))
    sid, ts_name, value_name = layout
    if (
        flat[0::6].count(sid) != n
        or flat[2::6].count(ts_name) != n
        or flat[4::6].count(value_name) != n
    ):
        return None
    return list(map(itemgetter(0), entries)), flat[1::6], flat[3::6], flat[5::6]


def _columns(
    series: list[str | bytes], stamps: list[str | bytes], values: list[str | bytes]
) -> tuple[list[str], npt.NDArray[np.int64], npt.NDArray[np.float64]] | None:
    """Series ids as text, timestamps and values as arrays when every row passes every rule,
    else None. The rules admit ASCII only, so bytes that pass are valid UTF-8."""
    distinct = dict.fromkeys(series)
    if isinstance(series[0], bytes):
        joined_ids = b"\n".join(cast("list[bytes]", list(distinct))) + b"\n"
        if (
            b"." in distinct
            or b".." in distinct
            or _SERIES_IDS_JOINED_BYTES.fullmatch(joined_ids) is None
        ):
            return None
        # Passed the regex, so ASCII without a newline: one decode for all of them.
        texts = dict(zip(distinct, joined_ids[:-1].decode("ascii").split("\n"), strict=True))
        series_ids = list(map(texts.__getitem__, series))
        joined: str | bytes = b"".join(cast("list[bytes]", stamps))
        odd = _NOT_IN_NUMBERS_BYTES.search(b"".join(cast("list[bytes]", values))) is not None
    else:
        if (
            "." in distinct
            or ".." in distinct
            or _SERIES_IDS_JOINED.fullmatch("\n".join(cast("list[str]", list(distinct))) + "\n")
            is None
        ):
            return None
        series_ids = cast("list[str]", series)
        joined = "".join(cast("list[str]", stamps))
        odd = _NOT_IN_NUMBERS.search("".join(cast("list[str]", values))) is not None
    if odd:
        return None
    if not (joined.isascii() and joined.isdigit()) or min(map(len, stamps)) == 0:
        return None
    if max(map(len, stamps)) > 19:
        return None
    n = len(stamps)
    try:
        # int() and float() take ASCII bytes as they take text (and refuse other bytes).
        ts = np.fromiter(map(int, stamps), dtype=np.int64, count=n)
        vals = np.fromiter(map(float, values), dtype=np.float64, count=n)
    except (ValueError, OverflowError):
        return None
    if int(ts.max()) > MAX_TIMESTAMP or not bool(np.isfinite(vals).all()):
        return None
    return series_ids, ts, vals


def _concat(a: ReadingBatch, b: ReadingBatch) -> ReadingBatch:
    versions = None
    if a.versions is not None or b.versions is not None:
        versions = (a.versions or [None] * len(a)) + (b.versions or [None] * len(b))
    return ReadingBatch(
        a.source_ids + b.source_ids,
        a.series_ids + b.series_ids,
        np.concatenate([a.timestamps, b.timestamps]),
        np.concatenate([a.values, b.values]),
        versions,
    )


def reading_fields(
    series_id: str, timestamp: int, value: float, version: str | None = None
) -> dict[str, str]:
    """The `readings` entry a producer writes."""
    fields = {"series_id": series_id, "timestamp": str(timestamp), "value": number(value)}
    if version:
        fields["version"] = version
    return fields
