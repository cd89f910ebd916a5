"""Series ids and versions: the rules of docs/api.md."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from detector.errors import InvalidSeriesError, InvalidVersionError
from detector.identifiers import format_version, parse_version, validate_series_id

ALLOWED = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.:-",
    min_size=1,
    max_size=128,
).filter(lambda s: s not in (".", ".."))


@given(ALLOWED)
def test_allowed_ids_pass(series_id):
    assert validate_series_id(series_id) == series_id


@pytest.mark.parametrize(
    "bad", ["", ".", "..", "a/b", "a b", "é", "a{b}", "x" * 129, "a\nb", "a*", "{a}"]
)
def test_bad_ids_state_the_rule(bad):
    with pytest.raises(InvalidSeriesError, match="1-128 characters"):
        validate_series_id(bad)


@given(st.text(min_size=1, max_size=200))
def test_any_text_is_accepted_only_within_the_rule(text):
    try:
        validate_series_id(text)
    except InvalidSeriesError:
        return
    assert len(text) <= 128 and text.isascii() and "/" not in text and "{" not in text


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("v3.0.0", (3, 0, 0)),
        ("v3", (3, 0, 0)),
        ("3", (3, 0, 0)),
        ("v3.1.0", (3, 1, 0)),
        ("12", (12, 0, 0)),
    ],
)
def test_versions_parse(text, parsed):
    assert parse_version(text) == parsed


@pytest.mark.parametrize(
    "bad", ["0", "v0", "v0.0.0", "-1", "v-1", "x", "v", "3.0", "v1.0", "v1..0"]
)
def test_malformed_versions(bad):
    with pytest.raises(InvalidVersionError):
        parse_version(bad)


def test_format():
    assert format_version(7) == "v7.0.0"
