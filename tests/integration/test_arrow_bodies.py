"""Arrow IPC stream bodies for fit and batch predict, against the real service: the same
answers, the same stored versions and the same rules as JSON, and a 4xx saying what is wrong
for every malformed body."""

from __future__ import annotations

import re
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from detector.kinds.training import MAX_TIMESTAMP
from tests.support.api import TS, VALUES, extra_api
from tests.support.services import start_api

ARROW = {"content-type": "application/vnd.apache.arrow.stream"}
ROOT = Path(__file__).resolve().parents[2]


def stream(table: pa.Table, *, compression: str | None = None) -> bytes:
    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression=compression)
    with pa.ipc.new_stream(sink, table.schema, options=options) as writer:
        writer.write_table(table, max_chunksize=4)  # several record batches
    return sink.getvalue().to_pybytes()


def points(timestamps, values, ts_type=pa.int64()) -> bytes:
    return stream(
        pa.table(
            {
                "timestamp": pa.array(timestamps, ts_type),
                "value": pa.array(values, pa.float64()),
            }
        )
    )


def post_arrow(client, path, body, **params):
    return client.post(path, content=body, headers=ARROW, params=params)


def stored(client, pg, series_id):
    versions = client.get(f"/models/{series_id}").json()["versions"]
    for v in versions:
        v.pop("created_at")
        v.pop("mlflow_run_id")
    rows = pg.execute(
        "SELECT m.version, p.ts, p.value FROM training_point_rows p "
        "JOIN model_versions m ON m.id = p.model_id WHERE m.series_id = %s ORDER BY 1, 2",
        (series_id,),
    ).fetchall()
    fitted = pg.execute(
        "SELECT version, kind, mean, std, sigma, direction, points_used, first_ts, last_ts, "
        "min_value, max_value, params FROM model_versions WHERE series_id = %s ORDER BY 1",
        (series_id,),
    ).fetchall()
    return versions, rows, fitted


# ---------------------------------------------------------------- the same as JSON


@pytest.mark.parametrize(
    ("options", "ts_type"),
    [
        ({}, pa.int64()),
        ({"sigma": 2.5, "direction": "both"}, pa.int64()),
        ({"kind": "multiscale", "direction": "below"}, pa.float64()),
    ],
)
def test_an_arrow_fit_answers_and_stores_what_the_same_json_fit_does(
    client, pg, series_id, options, ts_type
):
    rng = np.random.default_rng(7)
    ts = rng.permutation(np.arange(1_700_000_000, 1_700_000_000 + 60 * 500, 60))
    values = rng.normal(20, 3, ts.size)
    json_id, arrow_id = f"{series_id}-json", f"{series_id}-arrow"
    as_json = client.post(
        f"/fit/{json_id}",
        json={"timestamps": ts.tolist(), "values": values.tolist(), **options},
    )
    as_arrow = post_arrow(client, f"/fit/{arrow_id}", points(ts, values, ts_type), **options)
    assert as_json.status_code == as_arrow.status_code == 200, as_arrow.text
    assert {**as_arrow.json(), "series_id": json_id} == as_json.json()
    assert stored(client, pg, arrow_id) == stored(client, pg, json_id)


def test_an_arrow_batch_scores_what_the_same_json_batch_does(client, series_id):
    client.post(f"/fit/{series_id}", json={"timestamps": TS, "values": VALUES, "direction": "both"})
    rng = np.random.default_rng(8)
    values = rng.normal(10, 2, 1000)
    ts = np.arange(values.size)
    as_json = client.post(
        f"/predict/{series_id}/batch", json={"timestamps": ts.tolist(), "values": values.tolist()}
    )
    as_arrow = post_arrow(client, f"/predict/{series_id}/batch", points(ts, values), version="v1")
    assert as_json.status_code == as_arrow.status_code == 200, as_arrow.text
    assert as_arrow.json() == as_json.json()
    assert 0 < as_arrow.json()["anomalies"] < values.size


def test_a_content_type_with_parameters_and_none_at_all_are_json(client, series_id):
    body = b'{"timestamps": [1, 2, 3], "values": [1, 2, 4]}'
    typed = client.post(
        f"/fit/{series_id}",
        content=body,
        headers={"content-type": "application/json; charset=utf-8"},
    )
    untyped = client.post(f"/fit/{series_id}", content=body)
    assert typed.status_code == untyped.status_code == 200
    arrow = client.post(
        f"/fit/{series_id}",
        content=points([1, 2, 3], [1, 2, 4]),
        headers={"content-type": "Application/Vnd.Apache.Arrow.Stream; foo=bar"},
    )
    assert arrow.status_code == 200, arrow.text


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded"])
def test_json_sent_as_text_or_a_form_is_read_as_json(client, series_id, content_type):
    """What ``curl -d`` and plain clients send a JSON text as."""
    response = client.post(
        f"/fit/{series_id}",
        content=b'{"timestamps": [1, 2, 3], "values": [1, 2, 4]}',
        headers={"content-type": content_type},
    )
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    "content_type", ["application/xml", "multipart/form-data", "application/vnd.apache.arrow.file"]
)
def test_other_content_types_are_415(client, series_id, content_type):
    for path in (f"/fit/{series_id}", f"/predict/{series_id}/batch"):
        response = client.post(
            path,
            content=b'{"timestamps": [1, 2, 3], "values": [1, 2, 4]}',
            headers={"content-type": content_type},
        )
        assert response.status_code == 415, response.text
        detail = response.json()["detail"]
        assert content_type in detail and "application/vnd.apache.arrow.stream" in detail
    assert client.get(f"/models/{series_id}").status_code == 404


# ---------------------------------------------------------------- the same rules as JSON


@pytest.mark.parametrize(
    ("timestamps", "values"),
    [
        ([1, 2], [1.0, 2.0]),  # too few
        ([1, 2, 3], [5.0, 5.0, 5.0]),  # constant
        ([1, 1, 3], [1.0, 2.0, 3.0]),  # duplicate timestamp
        ([1.0, 2.5, 3.0], [1.0, 2.0, 3.0]),  # fractional timestamp
        ([1, -2, 3], [1.0, 2.0, 3.0]),  # negative timestamp
        ([1, 2, MAX_TIMESTAMP + 1], [1.0, 2.0, 3.0]),  # beyond the largest timestamp
        ([1.0, 2.0, 2.0**63], [1.0, 2.0, 3.0]),  # a float timestamp beyond it
    ],
)
def test_arrow_fits_break_the_rules_with_the_json_detail(client, series_id, timestamps, values):
    as_json = client.post(f"/fit/{series_id}", json={"timestamps": timestamps, "values": values})
    ts_type = pa.float64() if isinstance(timestamps[0], float) else pa.int64()
    as_arrow = post_arrow(client, f"/fit/{series_id}", points(timestamps, values, ts_type))
    assert as_json.status_code == as_arrow.status_code == 422, as_arrow.text
    assert as_arrow.json() == as_json.json()
    assert client.get(f"/models/{series_id}").status_code == 404  # nothing written


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values_are_refused_by_fit_and_batch(client, series_id, bad):
    body = points([1, 2, 3, 4], [1.0, bad, 3.0, 4.0])
    fit = post_arrow(client, f"/fit/{series_id}", body)
    assert fit.status_code == 422
    assert "finite" in fit.json()["detail"]
    assert client.get(f"/models/{series_id}").status_code == 404
    client.post(f"/fit/{series_id}", json={"timestamps": TS, "values": VALUES})
    batch = post_arrow(client, f"/predict/{series_id}/batch", body)
    assert batch.status_code == 422
    assert "finite" in batch.json()["detail"]


def test_batch_timestamps_follow_the_fit_rules(client, series_id):
    client.post(f"/fit/{series_id}", json={"timestamps": TS, "values": VALUES})
    for ts in ([1.5, 2.0], [-1, 2]):
        ts_type = pa.float64() if isinstance(ts[0], float) else pa.int64()
        response = post_arrow(
            client, f"/predict/{series_id}/batch", points(ts, [1.0, 2.0], ts_type)
        )
        assert response.status_code == 422
        assert "non-negative integers" in response.json()["detail"]


# ---------------------------------------------------------------- options in the query


def test_arrow_fit_options_are_query_parameters_checked_like_json_fields(client, series_id):
    body = points(TS, VALUES)
    cases = [
        ({"sigma": "0"}, "greater than 0"),
        ({"sigma": "abc"}, "valid number"),
        ({"sigma": "nan"}, "finite"),
        ({"direction": "up"}, "above"),
        ({"kind": "magic"}, "static"),
        ({"sigmaa": "2"}, "Extra inputs"),
    ]
    for params, needle in cases:
        response = post_arrow(client, f"/fit/{series_id}", body, **params)
        assert response.status_code == 422, (params, response.text)
        [issue] = response.json()["detail"]
        assert issue["loc"] == ["query", next(iter(params))]
        assert needle in issue["msg"]
    twice = client.post(f"/fit/{series_id}?sigma=2&sigma=3", content=body, headers=ARROW)
    assert twice.status_code == 422 and "more than once" in twice.text
    assert client.get(f"/models/{series_id}").status_code == 404
    ok = post_arrow(client, f"/fit/{series_id}", body, sigma="4", direction="both")
    assert ok.status_code == 200, ok.text
    assert (ok.json()["sigma"], ok.json()["direction"]) == (4.0, "both")


def test_a_json_fit_with_options_in_the_query_is_refused(client, series_id):
    response = client.post(
        f"/fit/{series_id}", params={"sigma": 4}, json={"timestamps": TS, "values": VALUES}
    )
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["query", "sigma"]
    assert "in the body" in response.text
    assert client.get(f"/models/{series_id}").status_code == 404


# ---------------------------------------------------------------- malformed bodies


def _table(**columns: pa.Array) -> pa.Table:
    return pa.table(columns)


def _no_eos(body: bytes) -> bytes:
    assert body.endswith(b"\xff\xff\xff\xff\x00\x00\x00\x00")
    return body[:-8]


def _file_format() -> bytes:
    sink = pa.BufferOutputStream()
    table = _table(timestamp=pa.array([1, 2, 3]), value=pa.array([1.0, 2.0, 4.0]))
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


GOOD = points([1, 2, 3, 4, 5, 6], [1.0, 2.0, 4.0, 3.0, 5.0, 1.0])
EXTENSION = pa.field("value", pa.float64(), metadata={b"ARROW:extension:name": b"my.unit"})
MALFORMED = {
    "empty": (b"", "empty"),
    "garbage": (b"definitely not an arrow stream", "not a valid Arrow IPC stream"),
    "json": (b'{"timestamps": [1, 2, 3], "values": [1, 2, 4]}', "not a valid Arrow IPC stream"),
    "file format": (_file_format(), "not a valid Arrow IPC stream"),
    "cut mid-message": (GOOD[: len(GOOD) // 2], "not a valid Arrow IPC stream"),
    "no end marker": (_no_eos(GOOD), "truncated"),
    "a batch dropped": (_no_eos(GOOD)[:-200], ""),
    "bytes after the end": (GOOD + b"\x00\x01", "after its last message"),
    "schema only, no end": (
        _no_eos(
            stream(_table(timestamp=pa.array([], pa.int64()), value=pa.array([], pa.float64())))
        ),
        "truncated",
    ),
    "no value column": (stream(_table(timestamp=pa.array([1, 2, 3]))), "no 'value' column"),
    "no timestamp column": (stream(_table(value=pa.array([1.0, 2.0, 4.0]))), "no 'timestamp'"),
    "an extra column": (
        stream(
            _table(
                timestamp=pa.array([1, 2, 3]),
                value=pa.array([1.0, 2.0, 4.0]),
                x=pa.array([1, 2, 3]),
            )
        ),
        "unexpected column 'x'",
    ),
    "a column twice": (
        stream(
            pa.Table.from_arrays(
                [pa.array([1, 2, 3]), pa.array([1.0, 2.0, 4.0]), pa.array([1.0, 2.0, 4.0])],
                names=["timestamp", "value", "value"],
            )
        ),
        "more than one column named 'value'",
    ),
    "int32 timestamps": (points([1, 2, 3], [1.0, 2.0, 4.0], pa.int32()), "int64 or float64"),
    "string timestamps": (points(["1", "2", "3"], [1.0, 2.0, 4.0], pa.string()), "(got string)"),
    "int64 values": (
        stream(_table(timestamp=pa.array([1, 2, 3]), value=pa.array([1, 2, 4]))),
        "'value' must be float64 (got int64)",
    ),
    "a timestamp column of lists": (
        stream(_table(timestamp=pa.array([[1], [2], [3]]), value=pa.array([1.0, 2.0, 4.0]))),
        "must be int64 or float64",
    ),
    "null timestamps": (points([1, None, 3], [1.0, 2.0, 4.0]), "'timestamp' holds nulls"),
    "null values": (points([1, 2, 3], [1.0, None, 4.0]), "'value' holds nulls"),
    "dictionary values": (
        stream(
            _table(
                timestamp=pa.array([1, 2, 3]), value=pa.array([1.0, 2.0, 4.0]).dictionary_encode()
            )
        ),
        "dictionary-encoded",
    ),
    "extension values": (
        stream(
            pa.table(
                [pa.array([1, 2, 3]), pa.array([1.0, 2.0, 4.0])],
                schema=pa.schema([pa.field("timestamp", pa.int64()), EXTENSION]),
            )
        ),
        "extension type my.unit",
    ),
    "uuid values": (
        stream(_table(timestamp=pa.array([1, 2, 3]), value=pa.array([b"0" * 16] * 3, pa.uuid()))),
        "extension type arrow.uuid",
    ),
    "compressed": (
        stream(
            _table(timestamp=pa.array([1, 2, 3]), value=pa.array([1.0, 2.0, 4.0])),
            compression="zstd",
        ),
        "compressed",
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
@pytest.mark.parametrize("route", ["fit", "batch"])
def test_malformed_arrow_bodies_are_422_saying_what_is_wrong(client, series_id, case, route):
    body, needle = MALFORMED[case]
    if route == "batch":
        client.post(f"/fit/{series_id}", json={"timestamps": TS, "values": VALUES})
    path = f"/fit/{series_id}" if route == "fit" else f"/predict/{series_id}/batch"
    response = post_arrow(client, path, body)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and needle in detail
    if route == "fit":
        assert client.get(f"/models/{series_id}").status_code == 404  # nothing written
    else:
        assert len(client.get(f"/models/{series_id}").json()["versions"]) == 1


@settings(max_examples=40)
@given(
    cut=st.integers(min_value=0, max_value=len(GOOD)),
    at=st.integers(min_value=0, max_value=len(GOOD) - 1),
    byte=st.integers(min_value=0, max_value=255),
    junk=st.binary(max_size=64),
)
def test_mangled_arrow_bodies_over_http_are_never_a_server_error(api_url, cut, at, byte, junk):
    body = bytearray(GOOD)
    body[at] = byte
    body = bytes(body[:cut]) + junk
    with httpx.Client(base_url=api_url, timeout=60) as http:
        response = post_arrow(http, "/fit/fuzz-arrow-fit", body)
    assert 200 <= response.status_code < 500, response.text
    if response.status_code != 200:
        assert isinstance(response.json()["detail"], str | list)


# ---------------------------------------------------------------- limits


def test_arrow_bodies_obey_the_point_and_byte_limits(settings):
    env = {"MAX_TRAINING_POINTS": "100", "MAX_BATCH_POINTS": "50", "MAX_BODY_BYTES": "65536"}
    with extra_api(settings, **env) as http:
        series = f"lim-{uuid.uuid4().hex[:8]}"
        over = points(np.arange(101), np.arange(101.0))
        response = post_arrow(http, f"/fit/{series}", over)
        assert response.status_code == 413
        assert "at most 100 points" in response.json()["detail"]
        assert (
            post_arrow(http, f"/fit/{series}", points(np.arange(100), np.arange(100.0))).status_code
            == 200
        )
        batch = post_arrow(http, f"/predict/{series}/batch", points(np.arange(51), np.arange(51.0)))
        assert batch.status_code == 413
        assert "at most 50 points" in batch.json()["detail"]
        # The byte limit (BodyGuard) acts before any decoding, whatever the content type.
        huge = post_arrow(http, f"/fit/{series}", GOOD + bytes(70_000))
        assert huge.status_code == 413
        assert "larger than the limit of 65536 bytes" in huge.json()["detail"]


# ---------------------------------------------------------------- OpenAPI and docs


def test_openapi_names_the_arrow_content_type(client):
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/fit/{series_id}", "/predict/{series_id}/batch"):
        body = paths[path]["post"]["requestBody"]
        assert set(body["content"]) == {"application/json", "application/vnd.apache.arrow.stream"}
        assert "timestamp" in body["description"]
        assert "415" in paths[path]["post"]["responses"]
    assert "sigma" in paths["/fit/{series_id}"]["post"]["requestBody"]["description"]


def test_the_documented_client_example_runs_as_printed(api_url):
    text = (ROOT / "docs" / "api.md").read_text()
    section = text.split("## Arrow bodies", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    shown = re.search(r"```text\n(.*?)```", section, re.S).group(1)
    series = f"doc-{uuid.uuid4().hex[:8]}"
    assert "http://127.0.0.1:8000" in code and "sensor-1" in code
    code = code.replace("http://127.0.0.1:8000", api_url).replace("sensor-1", series)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == shown.replace("sensor-1", series)


def test_pyarrow_is_loaded_with_the_first_arrow_body_only(settings):
    proc, url = start_api(settings)

    def arrow_loaded() -> bool:
        return "libarrow" in Path(f"/proc/{proc.pid}/maps").read_text()

    try:
        with httpx.Client(base_url=url, timeout=60) as http:
            series = f"lazy-{uuid.uuid4().hex[:8]}"
            assert http.post(f"/fit/{series}", json={"timestamps": TS, "values": VALUES}).is_success
            assert not arrow_loaded()  # a JSON-only process does not carry it (~26 MiB)
            assert post_arrow(http, f"/fit/{series}", points(TS, VALUES)).status_code == 200
            assert arrow_loaded()
    finally:
        proc.terminate()
        proc.wait(30)
