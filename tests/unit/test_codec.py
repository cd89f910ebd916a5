"""Property tests of the stream wire format: never a crash, and one verdict per entry."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from detector.wire.events import decode_event, event_fields
from detector.wire.readings import (
    DeadLetter,
    Reading,
    as_fields,
    decode_entry,
    flat_fields,
    parse_batch,
    parse_reading,
    reading_fields,
)

ids = st.text(alphabet="abcXYZ019_.:-", min_size=1, max_size=20).filter(
    lambda s: s not in (".", "..")
)
junk = st.text(max_size=30)
field_values = st.one_of(
    junk,
    st.integers(-5, 2**64).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["", " 1", "+1", "1.0", "1e3", "nan", "inf", "v1", "v0", "v2.1.0", "{a}"]),
)
entries = st.dictionaries(
    st.sampled_from(["series_id", "timestamp", "value", "version", "extra", "reason"]),
    field_values,
    max_size=6,
)


@given(entries)
def test_any_entry_is_a_reading_or_a_dead_letter_never_an_error(fields):
    verdict = parse_reading("1-0", fields)
    assert isinstance(verdict, Reading | DeadLetter)
    if isinstance(verdict, Reading):
        assert verdict.timestamp >= 0 and math.isfinite(verdict.value)
    else:
        dead = verdict.to_fields()
        assert dead["source_id"] == "1-0" and dead["reason"] == verdict.reason


@given(ids, st.integers(0, 2**62), st.floats(allow_nan=False, allow_infinity=False))
def test_what_a_producer_writes_parses_back_exactly(series_id, timestamp, value):
    reading = parse_reading("5-1", reading_fields(series_id, timestamp, value))
    assert reading == Reading("5-1", series_id, timestamp, value, None)


@given(
    st.lists(
        st.one_of(
            entries, st.builds(reading_fields, ids, st.integers(0, 10**12), st.floats(-1e9, 1e9))
        ),
        max_size=40,
    )
)
def test_the_vectorised_batch_parser_agrees_with_the_scalar_one(batch):
    raw = [(f"{i}-0", flat_fields(fields)) for i, fields in enumerate(batch)]
    readings, dead = parse_batch(raw)
    expected = [
        parse_reading(entry_id, fields)
        for entry_id, fields in zip([r[0] for r in raw], batch, strict=True)
        if fields
    ]
    got = [readings.reading(i) for i in range(len(readings))] + list(dead)
    key = lambda v: int(v.source_id.split("-")[0])  # noqa: E731
    assert sorted(got, key=key) == sorted(expected, key=key)


@given(
    st.lists(
        st.one_of(
            entries, st.builds(reading_fields, ids, st.integers(0, 10**12), st.floats(-1e9, 1e9))
        ),
        max_size=40,
    )
)
def test_bytes_parse_exactly_as_the_text_they_encode(batch):
    text = [(f"{i}-0", flat_fields(fields)) for i, fields in enumerate(batch)]
    raw = [(i, None if f is None else [part.encode() for part in f]) for i, f in text]
    (from_bytes, dead_bytes), (from_text, dead_text) = parse_batch(raw), parse_batch(text)
    assert [from_bytes.reading(i) for i in range(len(from_bytes))] == [
        from_text.reading(i) for i in range(len(from_text))
    ]
    assert dead_bytes == dead_text


@given(
    st.lists(st.binary(max_size=10), min_size=1, max_size=12).filter(
        lambda parts: any(not _utf8(p) for p in parts)
    )
)
def test_bytes_that_are_not_utf8_anywhere_are_a_bad_encoding_letter(flat):
    readings, dead = parse_batch([("3-0", flat)])
    assert len(readings) == 0
    assert [(d.source_id, d.reason) for d in dead] == [("3-0", "bad_encoding")]
    # The original fields, escaped, none lost (a repeated name is kept as name#2 …).
    assert dead[0].fields == as_fields(flat)
    assert len(dead[0].fields) == (len(flat) + 1) // 2
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in dead[0].fields.items())


def test_repeated_names_and_odd_lists_are_a_bad_encoding_letter():
    repeated = decode_entry("1-0", [b"series_id", b"a", b"series_id", b"b", b"value", b"1"])
    assert isinstance(repeated, DeadLetter) and repeated.reason == "bad_encoding"
    assert repeated.fields == {"series_id": "a", "series_id#2": "b", "value": "1"}
    odd = decode_entry("2-0", ["series_id", "a", "value"])
    assert isinstance(odd, DeadLetter) and odd.reason == "bad_encoding"
    assert odd.fields == {"series_id": "a", "value": ""}
    escaped = decode_entry("3-0", [b"value", b"1\xff"])
    assert isinstance(escaped, DeadLetter) and escaped.fields == {"value": "1\\xff"}


def _utf8(part: bytes) -> bool:
    try:
        part.decode()
    except UnicodeDecodeError:
        return False
    return True


@given(
    ids,
    st.integers(0, 2**62),
    st.floats(allow_nan=False, allow_infinity=False, width=64),
    st.floats(-1e6, 1e6),
    st.floats(1e-6, 1e6),
)
def test_events_round_trip_their_numbers(series_id, timestamp, value, mean, std):
    reading = Reading("7-3", series_id, timestamp, value)
    fields = event_fields(
        reading,
        version=3,
        mean=mean,
        std=std,
        lower=mean - 3 * std,
        upper=mean + 3 * std,
        score=(value - mean) / std,
        detected_at=1.5,
        extra={"episode_id": "e1", "value": "ignored"},
    )
    event = decode_event(fields)
    assert event["value"] == value and event["timestamp"] == timestamp
    assert event["mean"] == mean and event["std"] == std
    assert event["model_version"] == "v3.0.0" and event["source_id"] == "7-3"
    assert event["episode_id"] == "e1"  # extra fields ride along, never overriding ours


VALUES = {
    # A decimal number as JSON, C's strtod or any language's float parser writes it.
    "1": 1.0,
    "-1": -1.0,
    "+1": 1.0,
    "1.": 1.0,
    ".5": 0.5,
    "007": 7.0,
    "1e3": 1000.0,
    "1E-3": 0.001,
    "-0.0": -0.0,
    "1e+16": 1e16,
    "23.5": 23.5,
    # What Python's float() alone takes: whitespace, digit separators, other scripts' digits.
    " 1": None,
    "1 ": None,
    "1_000": None,
    "١٢": None,
    "0x10": None,
    "1e": None,
    ".": None,
    "--1": None,
    "1.2.3": None,
    "nan": None,
    "1e999": None,
}


@pytest.mark.parametrize(("text", "value"), VALUES.items())
def test_a_value_is_a_decimal_number_in_ascii(text, value):
    """One grammar for every path (the scalar parser, the vectorised one over bytes and over
    text): a value Python's float() takes but another language's parser refuses is a dead
    letter, never a reading scored as 1000 or 12."""
    fields = {"series_id": "s1", "timestamp": "1", "value": text}
    verdict = parse_reading("1-0", fields)
    entry = ("1-0", flat_fields(fields))
    for readings, dead in (
        parse_batch([entry]),
        parse_batch([(entry[0], [p.encode() for p in entry[1]])]),
    ):
        if value is None:
            assert isinstance(verdict, DeadLetter) and verdict.reason == "bad_value"
            assert len(readings) == 0 and [d.reason for d in dead] == ["bad_value"]
        else:
            assert verdict == Reading("1-0", "s1", 1, value, None)
            assert readings.reading(0) == verdict and not dead
