"""Every benchmark scenario by the name ``--only`` takes, in the order a full run takes them."""

from __future__ import annotations

from collections.abc import Callable

from bench.context import Context
from bench.report import Row
from bench.scenarios.backfill import scenario_backfill
from bench.scenarios.bulk_fit import scenario_bulk_fit
from bench.scenarios.fit import scenario_fit, scenario_fit_arrow
from bench.scenarios.kafka import scenario_kafka
from bench.scenarios.memory import scenario_memory
from bench.scenarios.rest import (
    scenario_batch,
    scenario_batch_arrow,
    scenario_predict,
    scenario_series_scaling,
)
from bench.scenarios.stream import scenario_stream, scenario_stream_scaling, scenario_stream_wide

SCENARIOS: dict[str, Callable[[Context], list[Row]]] = {
    "predict": scenario_predict,
    "batch": scenario_batch,
    "batch-arrow": scenario_batch_arrow,
    "fit": scenario_fit,
    "fit-arrow": scenario_fit_arrow,
    "scaling": scenario_series_scaling,
    "memory": scenario_memory,
    "stream": scenario_stream,
    "stream2": scenario_stream_scaling,
    "stream-wide": scenario_stream_wide,
    "kafka": scenario_kafka,
    "backfill": scenario_backfill,
    "bulk-fit": scenario_bulk_fit,
}
