"""docker-compose.yml, the Dockerfile and the dashboards agree with the code (no Docker engine
here: what can be checked without one is checked, and each service's command runs natively)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from api.metrics import ApiMetrics
from detector.mlflow_outbox import TrackerMetrics
from detector.settings import Settings
from tests.support.services import ROOT

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
SEED_PORTS = {
    "api": 8000,
    "redis": 6379,
    "postgres": 5432,
    "mlflow": 5000,
    "prometheus": 9090,
    "grafana": 3000,
}
SECRETS = ("REDIS_PASSWORD", "POSTGRES_PASSWORD", "GRAFANA_ADMIN_PASSWORD", "API_KEYS")
# What a user writes into .env for each secret .env.example leaves empty.
FILLED = {name: f"filled-{name.lower()}" for name in SECRETS}
# The worker's metric names (fixed by the stream contract); WorkerMetrics adds any more.
WORKER_METRICS = {
    "stream_readings_total",
    "anomalies_detected_total",
    "stream_dead_letters_total",
    "stream_consumer_lag",
    "stream_pending_entries",
    "stream_batch_duration_seconds_bucket",
    "stream_batch_duration_seconds_count",
    "stream_batch_duration_seconds_sum",
    "stream_events_emitted_total",
    "worker_last_batch_timestamp_seconds",
}
PROMQL_WORDS = {
    "sum", "max", "min", "avg", "count", "rate", "increase", "irate", "histogram_quantile",
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
    "time", "absent", "abs", "clamp_min", "bool", "offset", "humanize", "up", "vector",
}  # fmt: skip


def resolve(value: str) -> str:
    """A compose value with ${VAR:-default} and ${VAR:?message} resolved as a .env made from
    .env.example with its empty secrets filled in sets them."""
    example = {**env_example(), **FILLED}

    def substitute(match: re.Match[str]) -> str:
        name, op, rest = match.group(1), match.group(2), match.group(3)
        if name in example:
            return example[name]
        assert op == ":-", f"{name} has no default and is not in .env.example"
        return rest

    return re.sub(r"\$\{(\w+)(:[-?])?([^}]*)\}", substitute, value)


def env_example() -> dict[str, str]:
    pairs = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


def service_env(name: str) -> dict[str, str]:
    return {k: resolve(str(v)) for k, v in SERVICES[name]["environment"].items()}


def container_ports(name: str) -> set[int]:
    ports = set()
    for spec in SERVICES[name].get("ports", []) + SERVICES[name].get("expose", []):
        ports.add(int(str(spec).rsplit(":", 1)[-1]))
    return ports


def settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return Settings()


def sample_names(registry: CollectorRegistry) -> set[str]:
    """Every series name a registry can export, also for labelled metrics with no child yet."""
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}
    return {
        metric.name + suffix
        for metric in registry.collect()
        for suffix in suffixes.get(metric.type, [""])
    }


def known_metric_names() -> set[str]:
    registry = CollectorRegistry()
    ApiMetrics(registry)
    TrackerMetrics(registry)
    names = sample_names(registry) | WORKER_METRICS
    try:
        from detector.metrics import WorkerMetrics  # type: ignore[attr-defined]
    except ImportError:
        return names
    worker_registry = CollectorRegistry()
    WorkerMetrics(worker_registry)
    worker_names = sample_names(worker_registry)
    assert worker_names >= WORKER_METRICS, WORKER_METRICS - worker_names
    return names | worker_names


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers left once label matchers, grouping
    labels, strings and durations are removed, less PromQL's own words."""
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r'"[^"]*"', "", expr)
    return set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", expr)) - PROMQL_WORDS


def test_compose_services_ports_healthchecks_and_volumes() -> None:
    assert set(SERVICES) == {
        "api",
        "detector",
        "redis",
        "postgres",
        "mlflow",
        "prometheus",
        "grafana",
        # the `kafka` profile only (below)
        "kafka",
        "detector-kafka",
    }
    default = {name for name, service in SERVICES.items() if not service.get("profiles")}
    assert "kafka" not in default and "detector-kafka" not in default
    assert SERVICES["kafka"]["profiles"] == SERVICES["detector-kafka"]["profiles"] == ["kafka"]
    for name, port in SEED_PORTS.items():
        assert port in container_ports(name), name
    for name, service in SERVICES.items():
        assert "healthcheck" in service, name
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            assert source.startswith("./") or source in COMPOSE["volumes"], (name, volume)
    for name in ("api", "detector", "detector-kafka"):
        depends = SERVICES[name]["depends_on"]
        assert (
            depends["redis"]["condition"] == depends["postgres"]["condition"] == "service_healthy"
        )
    assert SERVICES["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"
    redis_command = " ".join(SERVICES["redis"]["command"])
    assert "--appendonly yes" in redis_command and "--requirepass" in redis_command


def test_secrets_come_from_env_and_are_required() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    for secret in SECRETS:
        assert re.search(r"\$\{" + secret + r":\?[^}]+\}", text), secret
        assert re.search(r"\$\{" + secret + r"(?!:\?)", text) is None, f"{secret} has a default"
        assert secret in env_example()
    assert "admin/admin" not in text
    assert service_env("grafana")["GF_SECURITY_ADMIN_PASSWORD"] == FILLED["GRAFANA_ADMIN_PASSWORD"]


def test_env_example_placeholders_cannot_start_compose() -> None:
    # `${VAR:?…}` refuses an unset *or empty* variable: .env.example leaves every secret empty,
    # so a copied .env starts nothing until each is set (a "change-me" value would pass).
    example = env_example()
    for secret in SECRETS:
        assert example[secret] == "", f"{secret} has a placeholder value in .env.example"
    text = (ROOT / ".env.example").read_text().lower()
    assert "change-me" not in text and "changeme" not in text


def test_api_keys_come_from_env() -> None:
    api = SERVICES["api"]["environment"]
    assert re.fullmatch(r"\$\{API_KEYS:\?[^}]+\}", api["API_KEYS"])
    assert re.fullmatch(r"\$\{API_READ_KEYS:-\}", api["API_READ_KEYS"])
    assert "API_READ_KEYS" in env_example()
    env = service_env("api")
    assert env["API_KEYS"] == FILLED["API_KEYS"] and env["API_READ_KEYS"] == ""
    # The workers take no HTTP requests: they are not given the keys.
    for name in ("detector", "detector-kafka"):
        assert "API_KEYS" not in SERVICES[name]["environment"]


def test_service_env_matches_settings_names_and_other_services(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("api", "detector", "detector-kafka"):
        env = service_env(name)
        unknown = {k for k in env if k.lower() not in Settings.model_fields}
        assert unknown == set(), f"{name} sets variables Settings does not read: {unknown}"
        settings = settings_from(env, monkeypatch)
        assert settings.redis_host == "redis" and settings.postgres_host == "postgres"
        assert settings.redis_port in container_ports("redis")
        assert settings.postgres_port in container_ports("postgres")
        assert settings.redis_password == FILLED["REDIS_PASSWORD"]
        postgres = service_env("postgres")
        assert settings.postgres_db == postgres["POSTGRES_DB"]
        assert settings.postgres_user == postgres["POSTGRES_USER"]
        assert settings.postgres_password == postgres["POSTGRES_PASSWORD"]
        assert settings.mlflow_tracking_uri == "http://mlflow:5000"
        assert 5000 in container_ports("mlflow")
    worker = settings_from(service_env("detector"), monkeypatch)
    assert getattr(worker, "metrics_port", 9101) in container_ports("detector")
    kafka_worker = settings_from(service_env("detector-kafka"), monkeypatch)
    assert kafka_worker.kafka_metrics_port in container_ports("detector-kafka")
    assert kafka_worker.kafka_bootstrap == "kafka://kafka:9092" and 9092 in container_ports("kafka")


def test_dockerfile_is_slim_non_root_with_healthcheck() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert dockerfile.startswith("#") and "FROM python:3.11-slim" in dockerfile
    user = re.findall(r"^USER\s+(\S+)", dockerfile, re.M)
    assert user and user[-1] not in ("root", "0")
    assert "HEALTHCHECK" in dockerfile
    cmd = json.loads(re.findall(r"^CMD\s+(\[.*\])", dockerfile, re.M)[-1])
    assert cmd == SERVICES["api"]["command"]


@pytest.mark.parametrize(
    "argv",
    [
        [sys.executable, "-m", "api", "--help"],
        [sys.executable, "-m", "detector", "--help"],
        [sys.executable, "-m", "detector.transports.kafka", "--help"],
        [str(Path(sys.executable).parent / "mlflow"), "server", "--help"],
    ],
    ids=["api", "detector", "detector-kafka", "mlflow"],
)
def test_service_commands_run_natively(argv: list[str]) -> None:
    if argv[2:3] == ["detector"] and not (ROOT / "detector" / "__main__.py").exists():
        pytest.skip("the detector worker is not there yet")
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage" in result.stdout.lower()


def test_mlflow_service_command_uses_options_the_server_knows() -> None:
    command = SERVICES["mlflow"]["command"]
    assert command[:2] == ["mlflow", "server"]
    mlflow = str(Path(sys.executable).parent / "mlflow")
    help_text = subprocess.run(
        [mlflow, "server", "--help"], capture_output=True, text=True, timeout=60
    ).stdout
    for option in command[2:]:
        assert option.split("=", 1)[0] in help_text, option
    assert "--port=5000" in command


def test_prometheus_scrapes_the_compose_services() -> None:
    config = yaml.safe_load((ROOT / "dashboards/prometheus/prometheus.yml").read_text())
    targets = {
        job["job_name"]: [t for sc in job["static_configs"] for t in sc["targets"]]
        for job in config["scrape_configs"]
    }
    api_port = int(SERVICES["api"]["command"][SERVICES["api"]["command"].index("--port") + 1])
    worker_port = int(service_env("detector")["METRICS_PORT"])
    assert targets == {"api": [f"api:{api_port}"], "detector": [f"detector:{worker_port}"]}
    assert api_port in container_ports("api") and worker_port in container_ports("detector")
    mounts = SERVICES["prometheus"]["volumes"]
    assert "./dashboards/prometheus:/etc/prometheus:ro" in mounts


def test_grafana_files_are_valid_and_use_only_defined_metrics() -> None:
    grafana = ROOT / "dashboards" / "grafana"
    datasource = yaml.safe_load((grafana / "provisioning/datasources/prometheus.yml").read_text())
    (source,) = datasource["datasources"]
    assert source["url"] == f"http://prometheus:{SEED_PORTS['prometheus']}"
    provider = yaml.safe_load((grafana / "provisioning/dashboards/provider.yml").read_text())
    dashboards_path = provider["providers"][0]["options"]["path"]
    assert f"./dashboards/grafana/dashboards:{dashboards_path}:ro" in SERVICES["grafana"]["volumes"]

    known = known_metric_names()
    dashboard = json.loads((grafana / "dashboards/anomaly.json").read_text())
    used: set[str] = set()
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == source["uid"]
            used |= metric_names(target["expr"])
    alert = yaml.safe_load((grafana / "provisioning/alerting/anomaly-rate.yml").read_text())
    for group in alert["groups"]:
        for rule in group["rules"]:
            assert rule["data"][0]["datasourceUid"] == source["uid"]
            used |= metric_names(rule["data"][0]["model"]["expr"])
    rules = yaml.safe_load((ROOT / "dashboards/prometheus/rules.yml").read_text())
    for group in rules["groups"]:
        for prometheus_rule in group["rules"]:
            used |= metric_names(prometheus_rule["expr"])
    assert used - known == set()
    assert {
        "http_requests_total",
        "anomalies_detected_total",
        "stream_consumer_lag",
        "episodes_opened_total",
        "series_stored",
    } <= used
