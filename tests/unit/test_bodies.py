"""The JSON array body parser's fast path (flat arrays parsed a slice at a time, item types
read off the bytes) answers exactly what parsing the whole body with orjson does."""

from __future__ import annotations

import json
import os

import numpy as np
import orjson
import pytest
from fastapi.exceptions import RequestValidationError
from hypothesis import given, settings
from hypothesis import strategies as st

from api import bodies

_ITEMS = st.one_of(
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.none(),
    st.sampled_from([1e5, -0.0, 10**18, 10**19, 2**63 - 1, 2**63, 2**64, -(2**63), -(2**63) - 1]),
)


def _outcome(parse, raw):
    try:
        body = parse(raw)
    except RequestValidationError as exc:
        return "invalid", [(tuple(e["loc"]), e["type"]) for e in exc.errors()]
    return (
        "ok",
        body.timestamps.dtype.str,
        body.timestamps.tolist(),
        body.values.tolist(),
        body.sigma,
    )


def _whole(raw):
    return bodies._from_body(orjson.loads(raw), with_options=True)


@settings(max_examples=int(os.environ.get("BODY_EXAMPLES", "300")))
@given(
    timestamps=st.lists(_ITEMS, max_size=40),
    values=st.lists(_ITEMS, max_size=40),
    sigma=st.none() | st.floats(0.5, 5),
    spaced=st.booleans(),
    slice_bytes=st.sampled_from([1, 7, 64, 1024 * 1024]),
)
def test_the_fast_path_answers_what_a_whole_parse_does(
    timestamps, values, sigma, spaced, slice_bytes, monkeypatch_module
):
    monkeypatch_module.setattr(bodies, "_SLICE_BYTES", slice_bytes)
    body = {"timestamps": timestamps, "values": values}
    if sigma is not None:
        body["sigma"] = sigma
    raw = json.dumps(body, indent=2 if spaced else None).encode()
    try:
        expected = _outcome(_whole, raw)
    except orjson.JSONDecodeError:  # an integer beyond 64 bits: orjson refuses the body
        with pytest.raises(RequestValidationError):
            bodies._parse(bytearray(raw), with_options=True)
        return
    got = _outcome(lambda r: bodies._parse(bytearray(r), with_options=True), raw)
    if slice_bytes >= len(raw) or got[0] == expected[0] == "ok":
        assert got == expected, raw
    elif not any(isinstance(x, int) and not -(2**63) <= x < 2**63 for x in timestamps):
        # A body parsed in slices names the first error of the first slice that has one.
        assert got[0] == expected[0] == "invalid", raw
    # else: a slice of integers beyond int64 is refused before a later float makes the whole
    # array float64; such timestamps are beyond the largest one the rules take either way.


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_a_flat_array_beside_one_that_is_not():
    raw = b'{"timestamps": [1, 2, 3], "values": [1, [2], 3]}'
    with pytest.raises(RequestValidationError) as caught:
        bodies._parse(bytearray(raw), with_options=True)
    assert caught.value.errors()[0]["loc"] == ("body", "values", 1)
    body = bodies._parse(bytearray(b'{"timestamps": [1, 2.5], "values": [ ]}'), with_options=True)
    assert body.timestamps.dtype == np.float64 and body.values.size == 0


@settings(max_examples=200)
@given(
    items=st.lists(
        st.tuples(st.integers(0, 2**62), st.booleans()).map(
            lambda t: float(t[0]) if t[1] else t[0]
        ),
        min_size=1,
        max_size=30,
    ),
    slice_bytes=st.sampled_from([1, 7, 1024 * 1024]),
)
def test_integral_timestamps_are_read_exactly(items, slice_bytes, monkeypatch_module):
    """An integral float among integer timestamps (``393.0``) leaves every integer exact: read
    as float64, 2**62 - 1 and 2**62 would become one timestamp."""
    monkeypatch_module.setattr(bodies, "_SLICE_BYTES", slice_bytes)
    raw = json.dumps({"timestamps": items, "values": [0.0] * len(items)}).encode()
    for parse in (_whole, lambda r: bodies._parse(bytearray(r), with_options=True)):
        body = parse(raw)
        assert body.timestamps.dtype == np.int64
        assert body.timestamps.tolist() == [int(x) for x in items]


def test_a_fit_body_of_timestamps_near_the_bound_with_an_integral_float():
    raw = b'{"timestamps": [4611686018427387904, 2688125373, 4611686018427387903, 393.0]'
    body = bodies._parse(bytearray(raw + b', "values": [1, 2, 3, 4]}'), with_options=True)
    assert body.timestamps.tolist() == [2**62, 2688125373, 2**62 - 1, 393]
