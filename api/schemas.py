"""Request and response bodies of the REST API."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StringConstraints

from detector.identifiers import SERIES_ID_RULE
from detector.kinds.registry import ModelKind
from detector.kinds.static import MAX_SIGMA
from detector.kinds.training import MAX_FIT_VALUE, MAX_TIMESTAMP
from detector.settings import Settings

Direction = Literal["above", "below", "both"]
Kind = ModelKind
# A JSON number that is finite; booleans and strings are refused (strict).
Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]
# Fit timestamps: JSON numbers; 1.0 counts as 1, 1.5 is refused by the model's rules.
JsonTimestamp = StrictInt | StrictFloat
# k in μ ± kσ: bounded above, as a k of 1e308 would make every bound infinite (see MAX_SIGMA).
Sigma = Annotated[float, Field(strict=True, gt=0, le=MAX_SIGMA, allow_inf_nan=False)]
DigitString = Annotated[str, StringConstraints(pattern=r"^[0-9]{1,19}$")]


class _Body(BaseModel):
    # Unknown fields are an error that names them: a mistyped "sigmaa" must not fit with k = 3.
    model_config = ConfigDict(extra="forbid")


class FitOptions(_Body):
    sigma: Sigma | None = Field(
        default=None, description=f"k in μ ± kσ, 0 < k ≤ {MAX_SIGMA:g} (default: the server's, 3)."
    )
    direction: Direction | None = Field(
        default=None, description="Which side is anomalous (default: the server's, above)."
    )
    kind: Kind | None = Field(
        default=None,
        description=(
            "Detector kind (default: the server's DEFAULT_KIND). seasonal and multiscale: the "
            "stream keeps a per-series state (seasonal: a daily and weekly profile learned "
            "online; point, short-window shift and distribution tests; one alert per "
            "excursion); POST /predict and the batch endpoint apply the μ ± kσ rule of the "
            "training data whatever the kind."
        ),
    )


class FitRequest(FitOptions):
    timestamps: list[JsonTimestamp] = Field(description="Unix seconds, one per value, any order.")
    values: list[Number] = Field(description="The training values.")


class FitResponse(BaseModel):
    series_id: str
    version: str
    points_used: int
    mean: float
    std: float
    sigma: float
    direction: Direction
    lower: float
    upper: float
    kind: Kind


class BulkSeries(_Body):
    # The id's rule is not in the schema: an id that breaks it is refused for that series
    # alone (listed under `refused`), not a 422 of the whole request.
    series_id: str = Field(
        description=f"{SERIES_ID_RULE}. A series given twice is refused the second time."
    )
    timestamps: list[JsonTimestamp] = Field(description="Unix seconds, one per value, any order.")
    values: list[Number] = Field(description="The training values.")


class BulkFitRequest(FitOptions):
    series: list[BulkSeries] = Field(
        min_length=1,
        description=(
            "The series to fit, each a new version under the same rules as "
            "`POST /fit/{series_id}`; the options apply to every one."
        ),
    )


class BulkRefusal(BaseModel):
    series_id: str
    status: int = Field(
        description="What a single fit of the series would answer: 422 (its points break a "
        "rule), 413 (more points than a fit takes), 503 (PostgreSQL refused its commit)."
    )
    detail: str = Field(description="Why, in the single fit's words.")


class BulkFitResponse(BaseModel):
    job: int = Field(description="The bulk fit job: its MLflow run lists the versions.")
    fitted: list[FitResponse] = Field(description="The stored versions, in request order.")
    refused: list[BulkRefusal] = Field(description="The series not fitted.")
    seconds: float = Field(description="How long the job took, fitting and storing.")


class PredictRequest(_Body):
    timestamp: StrictInt | DigitString | StrictFloat = Field(
        description='Unix seconds: an integer, or a string of decimal digits such as "1641013200".'
    )
    value: Number


class PredictResponse(BaseModel):
    anomaly: bool
    model_version: str


class BatchPredictRequest(_Body):
    timestamps: list[JsonTimestamp] = Field(description="Unix seconds, one per value.")
    values: list[Number]


class BatchPredictResponse(BaseModel):
    series_id: str
    model_version: str
    mean: float
    std: float
    sigma: float
    direction: Direction
    lower: float = Field(description="μ − kσ")
    upper: float = Field(description="μ + kσ")
    expected: float = Field(description="The expected value: μ for every point.")
    test: str = Field(
        description="The test that judges the points: threshold (μ ± kσ) for every kind."
    )
    anomalies: int = Field(description="How many points are anomalous.")
    anomaly: list[bool] = Field(description="Per point, in request order.")
    score: list[float] = Field(description="Per point: the signed z score (value − μ) / σ.")
    severity: list[float] = Field(
        description=(
            "Per point, 0–100: 100·r/(1 + r) with r = |z|/k, so 50 at the bound, approaching "
            "100 far beyond it (the stream's events use the same scale)."
        )
    )


class BackfillResponse(BaseModel):
    job: str = Field(description="The job id: pass it back (with `start`) to continue the job.")
    series_id: str
    start: int = Field(description="The index of this request's first reading in the job.")
    next_start: int = Field(description="The index the job's next reading takes.")
    scored: int = Field(description="Readings scored (all of them: the series has a model).")
    anomalies: int
    episodes_opened: int = Field(description="Episodes whose first anomaly is in this request.")
    stream: str = Field(description="The stream the events were also written to.")
    events: list[dict[str, Any]] = Field(
        description=(
            "The anomaly events, in reading order, with the live stream's fields (numbers "
            "typed) and `backfill`: the job id."
        )
    )


class VersionInfo(BaseModel):
    version: str
    mean: float
    std: float
    sigma: float
    direction: Direction
    points_used: int
    created_at: str
    mlflow_run_id: str | None
    kind: str = Field(default="static", description="The detector kind (static, multiscale).")


class SeriesModels(BaseModel):
    series_id: str
    versions: list[VersionInfo]


class SeriesSummary(BaseModel):
    series_id: str
    latest_version: str
    versions: int
    kind: Kind = Field(description="The latest version's kind.")


class SeriesPage(BaseModel):
    items: list[SeriesSummary]
    next: str | None


class Incident(BaseModel):
    incident_id: str = Field(
        description="`incident:` and the episode id of the onset that opened it."
    )
    source: str = Field(
        description="The output it is on: the anomalies stream, or `kafka:<topic>`."
    )
    state: Literal["open", "closed"]
    opened_at: float = Field(description="Unix seconds (Redis' clock), when it opened.")
    closed_at: float | None = Field(description="Unix seconds, when it closed; null while open.")
    closed_by: Literal["window", "idle"] | None = Field(
        description="`window`: an onset came past its window (event time); `idle`: no onset "
        "joined it for the window of arrival time. Null while open."
    )
    series_count: int = Field(description="Distinct series with an onset in it.")
    onset_count: int = Field(description="Episode onsets in it (a series may have several).")
    first_onset: int = Field(description="The earliest onset's reading timestamp.")
    last_onset: int = Field(description="The latest onset's reading timestamp.")


class IncidentPage(BaseModel):
    items: list[Incident] = Field(description="Newest first (by first onset).")
    next: str | None = Field(description="The next page's URL; null on the last page.")


class LatencySummary(BaseModel):
    avg: float
    p95: float
    p50: float
    p99: float


class Health(BaseModel):
    series_trained: int
    inference_latency_ms: LatencySummary
    training_latency_ms: LatencySummary
    dependencies: dict[str, str]


class ValidationIssue(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ErrorBody(BaseModel):
    """Every error: a sentence, or for malformed bodies the list of what is wrong where."""

    detail: str | list[ValidationIssue]
    dependency: str | None = Field(default=None, description="With 503: redis or postgres.")


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": description}
    for status, description in (
        (401, "No API key, or an unknown one (only when keys are configured)"),
        (403, "A read-only API key used to fit"),
        (404, "Unknown series or version"),
        (413, "Body or point count over the limit"),
        (422, "Malformed request, or data the model's rules reject"),
        (503, "Redis or PostgreSQL unavailable"),
    )
}


ARROW_MEDIA_TYPE = "application/vnd.apache.arrow.stream"

UNSUPPORTED_MEDIA_TYPE: dict[int | str, dict[str, Any]] = {
    415: {"model": ErrorBody, "description": "A content type other than JSON or Arrow stream"}
}


def body_schema(model: type[BaseModel], *, arrow_options: bool | None = None) -> dict[str, Any]:
    """OpenAPI request-body entry for a route that parses its own JSON body; with
    ``arrow_options`` given, the route also takes an Arrow IPC stream (`api.arrow`), whose
    options (if ``arrow_options``) are query parameters."""
    content: dict[str, Any] = {"application/json": {"schema": _inlined(model.model_json_schema())}}
    entry: dict[str, Any] = {"required": True, "content": content}
    if arrow_options is not None:
        options = (
            " Fit options go in query parameters `sigma`, `direction` and `kind` (as the JSON "
            "fields of the same names; with a JSON body they stay in the body)."
            if arrow_options
            else ""
        )
        entry["description"] = (
            f"JSON (the default, also when no content type is given), or `{ARROW_MEDIA_TYPE}`: "
            "an Apache Arrow IPC stream (not the file format), uncompressed, of record batches "
            "with the columns `timestamp` (int64, or float64 Unix seconds under the JSON rules) "
            "and `value` (float64), no nulls, nothing else; the same limits and rules as "
            f"JSON.{options} Any other content type is a 415."
        )
        content[ARROW_MEDIA_TYPE] = {"schema": {"type": "string", "format": "binary"}}
    return {"requestBody": entry}


def _inlined(schema: dict[str, Any]) -> dict[str, Any]:
    """A model's JSON schema with its nested models (``$defs``) written in place: a body
    schema sits inside the OpenAPI document, where ``#/$defs/…`` would point at its root."""
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(item) for item in node]
        return node

    resolved: dict[str, Any] = resolve(schema)
    return resolved


def declare_limits(openapi: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """State the size rules of this server's settings in its OpenAPI document (in place).

    The bodies parse their arrays themselves (see `api.bodies`), so their schemas get the
    limits here: at least ``min_training_points`` and at most ``max_training_points`` points
    to fit, at most ``max_batch_points`` to score, and fit timestamps unique. What JSON Schema
    cannot say (a constant series, ``timestamps`` and ``values`` of unequal length) stays a
    422 that says so.
    """
    limits = {
        "/fit/{series_id}": {
            "minItems": settings.min_training_points,
            "maxItems": settings.max_training_points,
        },
        "/predict/{series_id}/batch": {"minItems": 1, "maxItems": settings.max_batch_points},
        "/backfill/{series_id}": {"minItems": 1, "maxItems": settings.max_batch_points},
    }
    for path, items in limits.items():
        body = openapi["paths"][path]["post"]["requestBody"]["content"]["application/json"]
        properties = body["schema"]["properties"]
        for name in ("timestamps", "values"):
            properties[name].update(items)
        # JSON Schema's "integer" takes 1.0 as 1, exactly as the fit rules do.
        properties["timestamps"]["items"] = {
            "type": "integer",
            "minimum": 0,
            "maximum": MAX_TIMESTAMP,
        }
        if path == "/fit/{series_id}":
            properties["timestamps"]["uniqueItems"] = True
            # The fit's bound (detector.kinds.training): (x − μ)² must not overflow float64.
            properties["values"]["items"].update(minimum=-MAX_FIT_VALUE, maximum=MAX_FIT_VALUE)
    predict = openapi["paths"]["/predict/{series_id}"]["post"]["requestBody"]
    timestamp = predict["content"]["application/json"]["schema"]["properties"]["timestamp"]
    timestamp["anyOf"] = [
        {"type": "integer", "minimum": 0, "maximum": MAX_TIMESTAMP},
        # 19 digits may pass 2**63 - 1: the schema promises the 18 that always fit.
        {"type": "string", "pattern": r"^[0-9]{1,18}$"},
    ]
    return openapi
