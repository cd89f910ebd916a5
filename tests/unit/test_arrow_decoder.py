"""The Arrow body decoder on arbitrary bytes: two arrays or an error that becomes a 4xx, never
anything else (which the API would answer with a 500)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from api import arrow
from api.arrow import ArrowBodyError, decode
from detector.errors import TooLargeError

MAX_POINTS = 1000


def _stream(table: pa.Table, chunk: int, compression: str | None = None) -> bytes:
    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression=compression)
    with pa.ipc.new_stream(sink, table.schema, options=options) as writer:
        writer.write_table(table, max_chunksize=chunk)
    return sink.getvalue().to_pybytes()


def _check(body: bytes) -> None:
    try:
        timestamps, values = decode(bytearray(body), max_points=MAX_POINTS, what="a fit")
    except (ArrowBodyError, TooLargeError) as exc:
        assert exc.detail  # a sentence saying what is wrong
        return
    assert timestamps.ndim == values.ndim == 1
    assert timestamps.shape == values.shape
    assert timestamps.dtype in (np.int64, np.float64) and values.dtype == np.float64
    assert len(values) <= MAX_POINTS


@settings(max_examples=300)
@given(st.binary(max_size=4096))
def test_arbitrary_bytes(body):
    _check(body)


@settings(max_examples=100)
@given(st.binary(max_size=512))
def test_arbitrary_bytes_after_a_stream_header(body):
    # Past the first length prefix, so the bytes reach the flatbuffer verifier and beyond.
    _check(b"\xff\xff\xff\xff" + len(body).to_bytes(4, "little") + body)


_COLUMN = st.sampled_from(
    [
        pa.int64(),
        pa.float64(),
        pa.int32(),
        pa.float32(),
        pa.string(),
        pa.bool_(),
        pa.timestamp("s"),
        pa.list_(pa.int64()),
    ]
)


@st.composite
def _tables(draw: st.DrawFn) -> pa.Table:
    n = draw(st.integers(0, 30))
    names = draw(
        st.lists(st.sampled_from(["timestamp", "value", "x"]), min_size=1, max_size=3, unique=True)
    )
    columns = {}
    for name in names:
        kind = draw(_COLUMN)
        floats = st.floats(allow_nan=True, allow_infinity=True)
        if kind == pa.float64() or kind == pa.float32():
            data = draw(st.lists(st.none() | floats, min_size=n, max_size=n))
        elif kind == pa.string():
            data = [str(i) for i in range(n)]
        elif kind == pa.bool_():
            data = [bool(i % 2) for i in range(n)]
        elif kind == pa.list_(pa.int64()):
            data = [[i] for i in range(n)]
        else:
            data = draw(
                st.lists(st.none() | st.integers(-(2**31), 2**31 - 1), min_size=n, max_size=n)
            )
        columns[name] = pa.array(data, kind)
    return pa.table(columns)


@settings(max_examples=200)
@given(
    table=_tables(),
    chunk=st.integers(1, 40),
    compression=st.sampled_from([None, None, "lz4", "zstd"]),
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
    cut=st.none() | st.integers(0, 10_000),
)
def test_valid_streams_mangled(table, chunk, compression, edits, cut):
    body = bytearray(_stream(table, chunk, compression))
    for at, byte in edits:
        body[at % len(body)] = byte
    if cut is not None:
        del body[cut % (len(body) + 1) :]
    _check(bytes(body))


@pytest.mark.parametrize("rows", [MAX_POINTS + 1, 5 * MAX_POINTS])
def test_more_rows_than_the_limit_are_refused_before_decoding(rows):
    table = pa.table({"timestamp": pa.array(range(rows)), "value": pa.array([1.0] * rows)})
    with pytest.raises(TooLargeError, match=f"at most {MAX_POINTS} points"):
        decode(bytearray(_stream(table, 300)), max_points=MAX_POINTS, what="a fit")


def test_the_number_of_record_batches_is_bounded(monkeypatch):
    monkeypatch.setattr(arrow, "MAX_BATCHES", 5)
    table = pa.table({"timestamp": pa.array(range(6)), "value": pa.array([1.0] * 6)})
    with pytest.raises(ArrowBodyError, match="more than 5 record batches"):
        decode(bytearray(_stream(table, 1)), max_points=MAX_POINTS, what="a fit")
    assert decode(bytearray(_stream(table, 2)), max_points=MAX_POINTS, what="a fit")[1].size == 6


def test_one_batch_is_read_in_place_and_several_are_joined():
    table = pa.table({"value": pa.array([1.5, 2.5, 3.5]), "timestamp": pa.array([3, 1, 2])})
    body = bytearray(_stream(table, 3))
    timestamps, values = decode(body, max_points=10, what="a fit")
    assert timestamps.tolist() == [3, 1, 2] and values.tolist() == [1.5, 2.5, 3.5]
    assert not values.flags.owndata  # a view of the body: no copy
    timestamps, values = decode(bytearray(_stream(table, 1)), max_points=10, what="a fit")
    assert timestamps.tolist() == [3, 1, 2] and values.tolist() == [1.5, 2.5, 3.5]
