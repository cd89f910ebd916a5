"""Schemathesis against the live OpenAPI of the running service: no 5xx, responses match."""

from __future__ import annotations

import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.generation.hypothesis.builder import (
    HypothesisTestConfig,
    HypothesisTestMode,
    create_test,
)
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.support.services import start_api

EXAMPLES = 150
# An endless Server-Sent Events stream: tested on its own in test_events.py.
SKIPPED = {"/events"}


KEY = "fuzz-write-key"


@pytest.fixture(scope="module")
def operations(settings):
    # API keys on, so schemathesis also checks that every protected route refuses no key.
    proc, url = start_api(settings, API_KEYS=KEY)
    yield _operations(url)
    proc.terminate()
    proc.wait(30)


def _operations(url):
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    found = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        found[f"{operation.method.upper()} {operation.path}"] = operation
    return found


ROUTES = [
    "POST /fit/{series_id}",
    "POST /fit",
    "POST /predict/{series_id}",
    "POST /predict/{series_id}/batch",
    "POST /backfill/{series_id}",
    "GET /models/{series_id}",
    "GET /models",
    "GET /healthcheck",
    "GET /plot",
    "GET /metrics",
    "GET /incidents",
    "POST /anomalies/{episode_id}/feedback",
    "POST /series/{series_id}/feedback",
    "GET /series/{series_id}/feedback",
]


def test_every_route_is_fuzzed(operations):
    documented = {name for name in operations if name.split(" ", 1)[1] not in SKIPPED}
    assert documented >= set(ROUTES)
    assert not documented - set(ROUTES) - {"GET /anomalies"}, "fuzz the new routes too"


@pytest.mark.slow
@pytest.mark.parametrize("route", [*ROUTES, "GET /anomalies"])
def test_no_server_errors_and_responses_match_the_schema(operations, route):
    if route not in operations:
        pytest.skip(f"{route} is not served yet")
    calls = []

    @given(case=operations[route].as_strategy())
    @settings(
        max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None
    )
    def fuzz(case):
        calls.append(case)
        # The schema cannot say "not constant" or "unique timestamps": such data is a documented
        # 422, so the check that schema-valid data must be accepted does not apply.
        case.call_and_validate(
            headers={"X-API-Key": KEY}, excluded_checks=[positive_data_acceptance]
        )

    fuzz()
    print(f"schemathesis: {route}: {len(calls)} examples")
    assert len(calls) >= 1


POSITIVE_EXAMPLES = 40


def _usable(route, case):
    """JSON Schema cannot say "as many values as timestamps" or "not constant": the arrays
    are cut to one length, and training series that are constant or nearly so (a spread that
    underflows float64, e.g. values within 1e-313 of each other: a documented 422) are skipped."""
    body = case.body
    if isinstance(body, dict) and all(isinstance(body.get(k), int | float) for k in ("from", "to")):
        return body["from"] <= body["to"]  # a missed range runs forward: a documented 422
    if not isinstance(body, dict) or "timestamps" not in body or "values" not in body:
        return True
    n = min(len(body["timestamps"]), len(body["values"]))
    body["timestamps"], body["values"] = body["timestamps"][:n], body["values"][:n]
    return not route.startswith("POST /fit/") or float(np.std(np.asarray(body["values"]))) > 0


@pytest.mark.slow
@pytest.mark.parametrize("route", [*(r for r in ROUTES if r != "GET /metrics"), "GET /anomalies"])
def test_schema_valid_requests_are_accepted(operations, route):
    """Every rule the schema states is the server's: a request that follows it gets a 2xx
    (or 404 for a series that does not exist), never a 422 the schema did not announce."""
    calls = []

    @given(case=operations[route].as_strategy(generation_mode=GenerationMode.POSITIVE))
    @settings(
        max_examples=POSITIVE_EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    def fuzz(case):
        if not _usable(route, case):
            return
        calls.append(case)
        case.call_and_validate(headers={"X-API-Key": KEY}, checks=[positive_data_acceptance])

    fuzz()
    print(f"schemathesis positive: {route}: {len(calls)} examples")
    assert len(calls) >= 1


@pytest.mark.slow
@pytest.mark.parametrize("route", [*ROUTES, "GET /anomalies"])
def test_boundary_values_give_no_server_errors(operations, route):
    """Schemathesis' coverage phase: each parameter and field at and beyond the bounds the
    schema states (the largest integers, empty strings, each type in turn), one case each.
    Random fuzzing seldom reaches such values (``start=2**70`` on a backfill was a 500)."""
    operation = operations[route]
    calls = []

    def check(case):
        calls.append(case)
        case.call_and_validate(
            headers={"X-API-Key": KEY}, excluded_checks=[positive_data_acceptance]
        )

    test = create_test(
        operation=operation,
        test_func=check,
        config=HypothesisTestConfig(
            project=operation.schema.config,
            modes=[HypothesisTestMode.COVERAGE],
            settings=settings(
                deadline=None, suppress_health_check=list(HealthCheck), database=None
            ),
        ),
    )
    test()
    print(f"schemathesis coverage: {route}: {len(calls)} cases")
    assert len(calls) >= 1
