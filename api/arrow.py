"""Apache Arrow IPC stream bodies (``application/vnd.apache.arrow.stream``) for fit and batch
predict: columns ``timestamp`` (int64, or float64 Unix seconds) and ``value`` (float64); a bulk
fit's rows also name their series (``series_id``, string).

Decoding is zero-copy: record batches are read straight out of the received body and their
columns become numpy views of it (a body of several batches is copied once, into one array
per column). Nothing here judges the data itself: the arrays go through the same rules as a
JSON body's (`detector.kinds.training`), so the two content types cannot disagree.

What the decoder refuses before it decodes a batch, every one a 4xx that says why:

- more points than the route takes (413), counted from the batches' headers, and more than
  `MAX_BATCHES` record batches;
- compressed batches (IPC body compression): a few kilobytes of zstd can expand to gigabytes,
  beyond what the body size limit and the memory budget account for;
- any schema but the route's columns and their types: a missing, extra or duplicated column, a
  dictionary-encoded or extension column, another type;
- nulls, a truncated stream (a message cut short, or no end-of-stream marker), bytes after the
  end-of-stream marker, and anything that is not an Arrow IPC stream at all.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import pyarrow as pa

from detector.errors import InvalidInputError, TooLargeError

TIMESTAMP, VALUE, SERIES_ID = "timestamp", "value", "series_id"
COLUMN_TYPES = {TIMESTAMP: (pa.int64(), pa.float64()), VALUE: (pa.float64(),)}
# A bulk fit's rows (``POST /fit``): each names its series.
BULK_COLUMN_TYPES = {SERIES_ID: (pa.string(), pa.large_string()), **COLUMN_TYPES}
_TYPE_NAMES = {
    pa.int64(): "int64",
    pa.float64(): "float64",
    pa.string(): "string",
    pa.large_string(): "large_string",
}
_EXTENSION_KEY = b"ARROW:extension:name"
# The end-of-stream marker: a continuation token and a zero length (older writers: 4 zero bytes).
_END_MARKERS = (b"\xff\xff\xff\xff\x00\x00\x00\x00", b"\x00\x00\x00\x00")
# Decoding costs ~50-60 µs a record batch whatever its rows: a body of many tiny batches would cost
# ten times the CPU of a JSON body of its size, so their number is bounded.
MAX_BATCHES = 10_000
# flatbuffers Message.header_type for a RecordBatch (Message.fbs: MessageHeader).
_RECORD_BATCH_HEADER = 3
# Whatever pyarrow (or the flatbuffer peek) raises for bytes that are not a valid stream.
_DECODE_ERRORS = (pa.ArrowException, ValueError, OSError, EOFError, IndexError, TypeError)


class ArrowBodyError(InvalidInputError):
    """An Arrow body that is malformed or does not hold the two columns as specified (422)."""


def decode(
    raw: bytes | bytearray,
    *,
    max_points: int,
    what: str,
    columns: dict[str, tuple[Any, ...]] = COLUMN_TYPES,
) -> tuple[Any, ...]:
    """The ``columns`` of an Arrow IPC stream body, in their order: by default
    ``(timestamps, values)`` as numpy arrays (timestamps int64 or float64 as sent, values
    float64), a string column (``BULK_COLUMN_TYPES``' series ids) as a pyarrow array; not yet
    checked against the data rules.

    Raises ArrowBodyError (422) for a body that is not such a stream, TooLargeError (413) for
    one of more than ``max_points`` rows (before any batch is decoded).
    """
    if not raw:
        raise ArrowBodyError("the Arrow body is empty: a stream starts with its schema message")
    try:
        return _decode(
            pa.py_buffer(raw), len(raw), max_points=max_points, what=what, columns=columns
        )
    except (ArrowBodyError, TooLargeError):
        raise
    except _DECODE_ERRORS as exc:
        message = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ArrowBodyError(f"the body is not a valid Arrow IPC stream: {message}") from None


def _decode(
    buffer: Any, size: int, *, max_points: int, what: str, columns: dict[str, tuple[Any, ...]]
) -> tuple[Any, ...]:
    source = pa.BufferReader(buffer)
    reader = pa.ipc.MessageReader.open_stream(source)
    messages: list[Any] = []
    schema = None
    rows = 0
    end = 0  # where the last message read ends
    while True:
        try:
            message = reader.read_next_message()
        except StopIteration:
            break
        end = source.tell()
        if schema is None:
            if message.type != "schema":
                raise ArrowBodyError(
                    f"the Arrow stream starts with a {message.type} message, not its schema"
                )
            schema = pa.ipc.read_schema(message)
            _check_schema(schema, columns)
            continue
        if message.type != "record batch":
            raise ArrowBodyError(
                f"the Arrow stream holds a {message.type} message; only record batches "
                "may follow the schema"
            )
        length, compressed = _peek_record_batch(message.metadata.to_pybytes())
        if compressed:
            raise ArrowBodyError(
                "the Arrow stream's record batches are compressed; send them uncompressed"
            )
        if len(messages) == MAX_BATCHES:
            raise ArrowBodyError(
                f"the Arrow stream holds more than {MAX_BATCHES} record batches; "
                "write the points in fewer, larger ones"
            )
        rows += length
        if rows > max_points:
            raise TooLargeError(f"{what} takes at most {max_points} points (this body holds more)")
        messages.append(message)
    if schema is None:
        raise ArrowBodyError("the Arrow stream has no schema message")
    tail = size - end
    if not _ends_with_marker(buffer, end, size):
        raise ArrowBodyError(
            "the Arrow stream is truncated: it does not end with the end-of-stream marker "
            "(close the stream writer before sending)"
            if tail == 0
            else f"the Arrow stream has {tail} bytes after its last message that are not "
            "exactly its end-of-stream marker"
        )
    batches = []
    for message in messages:
        batch = pa.ipc.read_record_batch(message, schema)
        batch.validate(full=True)
        batches.append(batch)
    return tuple(_column(batches, schema, name, rows) for name in columns)


def _ends_with_marker(buffer: Any, end: int, size: int) -> bool:
    if size - end > max(map(len, _END_MARKERS)):
        return False
    return bool(buffer[end:size].to_pybytes() in _END_MARKERS)


def _check_schema(schema: Any, columns: dict[str, tuple[Any, ...]]) -> None:
    names = list(schema.names)
    wanted_names = [repr(name) for name in columns]
    listed = ", ".join(wanted_names[:-1]) + f" and {wanted_names[-1]}"
    for name in names:
        if names.count(name) > 1:
            raise ArrowBodyError(f"the Arrow schema has more than one column named {name!r}")
        if name not in columns:
            raise ArrowBodyError(
                f"unexpected column {name!r}: the Arrow body takes exactly the columns {listed}"
            )
    for name, allowed in columns.items():
        if name not in names:
            raise ArrowBodyError(f"the Arrow body has no {name!r} column (it takes {listed})")
        field = schema.field(name)
        wanted = " or ".join(_TYPE_NAMES[t] for t in allowed)
        if pa.types.is_dictionary(field.type):
            raise ArrowBodyError(f"column {name!r} is dictionary-encoded; send it plain {wanted}")
        extension = (field.metadata or {}).get(_EXTENSION_KEY)
        if isinstance(field.type, pa.BaseExtensionType) or extension is not None:
            label = extension.decode(errors="replace") if extension else field.type.extension_name
            raise ArrowBodyError(
                f"column {name!r} has the extension type {label}; send it plain {wanted}"
            )
        if field.type not in allowed:
            got = _TYPE_NAMES.get(field.type, str(field.type))
            raise ArrowBodyError(f"column {name!r} must be {wanted} (got {got})")


def _column(batches: list[Any], schema: Any, name: str, rows: int) -> Any:
    index = schema.get_field_index(name)
    arrays = [batch.column(index) for batch in batches]
    for array in arrays:
        if array.null_count:
            raise ArrowBodyError(f"column {name!r} holds nulls; every row needs a {name}")
    if pa.types.is_string(schema.field(name).type) or pa.types.is_large_string(
        schema.field(name).type
    ):
        return pa.chunked_array(arrays, type=schema.field(name).type)
    dtype = np.float64 if schema.field(name).type == pa.float64() else np.int64
    if len(arrays) == 1:  # the common case: a view of the body itself
        return arrays[0].to_numpy(zero_copy_only=True)
    out = np.empty(rows, dtype=dtype)
    at = 0
    for array in arrays:
        out[at : at + len(array)] = array.to_numpy(zero_copy_only=True)
        at += len(array)
    return out


def _peek_record_batch(meta: bytes) -> tuple[int, bool]:
    """(rows, compressed) of a record batch message, read from its flatbuffer metadata before
    pyarrow decodes (and would decompress) it. pyarrow has verified the flatbuffer already;
    every read here is bounds-checked all the same."""
    message = _u32(meta, 0)
    header_type = _field(meta, message, 1)
    header = _field(meta, message, 2)
    if header_type is None or header is None or _u8(meta, header_type) != _RECORD_BATCH_HEADER:
        raise ArrowBodyError("a record batch message without a record batch header")
    batch = header + _u32(meta, header)
    length_at = _field(meta, batch, 0)
    length = 0 if length_at is None else _i64(meta, length_at)
    if length < 0:
        raise ArrowBodyError(f"a record batch of negative length ({length})")
    return length, _field(meta, batch, 3) is not None


def _field(meta: bytes, table: int, index: int) -> int | None:
    """Position of field ``index`` of the flatbuffer table at ``table``; None when absent."""
    vtable = table - _i32(meta, table)
    entry = 4 + 2 * index
    if entry + 2 > _u16(meta, vtable):
        return None
    offset = _u16(meta, vtable + entry)
    return table + offset if offset else None


def _read(fmt: str, meta: bytes, pos: int) -> int:
    if pos < 0 or pos + struct.calcsize(fmt) > len(meta):
        raise ArrowBodyError("a record batch message with malformed metadata")
    value: int = struct.unpack_from(fmt, meta, pos)[0]
    return value


def _u8(meta: bytes, pos: int) -> int:
    return _read("<B", meta, pos)


def _u16(meta: bytes, pos: int) -> int:
    return _read("<H", meta, pos)


def _u32(meta: bytes, pos: int) -> int:
    return _read("<I", meta, pos)


def _i32(meta: bytes, pos: int) -> int:
    return _read("<i", meta, pos)


def _i64(meta: bytes, pos: int) -> int:
    return _read("<q", meta, pos)
