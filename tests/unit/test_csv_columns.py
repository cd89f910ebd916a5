"""The backfill's column-wise CSV reading keeps ``publish``'s row-by-row rules and outcomes."""

from __future__ import annotations

import contextlib
import io

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from detector.identifiers import parse_version
from ingest.cli import build_parser, csv_columns, csv_rows

cells = st.sampled_from(["", " ", "x", "-1", "1.5", "nan", "inf", "1e3", "2014-04-01 00:00:00"])
series = st.one_of(st.sampled_from(["s1", "s-2", "bad id", "", "a" * 129, "."]), cells)
stamps = st.one_of(st.integers(0, 2**40).map(str), cells)
values = st.one_of(st.floats(allow_nan=False, allow_infinity=False).map(repr), cells)
versions = st.sampled_from(["", "v1", "2", "v1.1.0", "vx"])


@settings(max_examples=200)
@given(
    st.lists(st.tuples(series, stamps, values, versions), max_size=40),
    st.booleans(),
    st.integers(1, 7),
)
def test_csv_columns_keeps_the_rows_and_refusals_of_csv_rows(
    rows: list[tuple[str, str, str, str]], with_version: bool, size: int
) -> None:
    header = ["series_id", "timestamp", "value"] + (["version"] if with_version else [])
    text = (
        ",".join(header)
        + "\n"
        + "".join(",".join(f'"{c}"' for c in row[: len(header)]) + "\n" for row in rows)
    )
    expected_good, expected_bad = [], []
    for line, outcome in csv_rows(io.StringIO(text), "fallback"):
        if isinstance(outcome, str):
            expected_bad.append(line)
        else:
            version = outcome.get("version")
            expected_good.append(
                (
                    outcome["series_id"],
                    int(outcome["timestamp"]),
                    float(outcome["value"]),
                    parse_version(version)[0] if version else None,
                )
            )
    good, bad = [], []
    for ids, ts, vals, pinned, refused in csv_columns(io.StringIO(text), "fallback", size):
        assert len(ids) <= size
        good += list(zip(ids, ts, vals, pinned or [None] * len(ids), strict=True))
        bad += [line for line, _ in refused]
    assert good == expected_good
    assert bad == expected_bad


@settings(max_examples=100)
@given(st.one_of(st.integers(-(2**80), 2**80), st.integers(0, 2**53 + 2), cells))
def test_backfill_start_takes_an_index_below_2_53_or_says_why(text: object) -> None:
    """``--start`` is parsed as the API's ``start`` is checked: an integer in [0, 2**53)
    (an index beyond it made the state's bookkeeping unstorable)."""
    argv = ["backfill", "--csv", "history.csv", "--start", str(text)]
    try:
        value = int(str(text))
    except ValueError:
        value = None
    if value is not None and 0 <= value < 2**53:
        assert build_parser().parse_args(argv).start == value
    else:
        with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()) as err:
            build_parser().parse_args(argv)
        assert "--start" in err.getvalue()
