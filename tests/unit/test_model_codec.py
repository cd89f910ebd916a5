"""The Redis form of a model version: exact round trips, the form written before, and the
size that keeps a series' hash packed (every value at most 64 bytes)."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from detector.kinds.registry import MODEL_CLASSES
from detector.store.codec import ModelVersion

CREATED = datetime.fromtimestamp(1_796_217_645, UTC)
finite = st.floats(allow_nan=False, allow_infinity=False, width=64)


@given(
    kind=st.sampled_from(sorted(MODEL_CLASSES)),
    direction=st.sampled_from(["above", "below", "both"]),
    mean=finite,
    std=finite.filter(lambda x: x > 0),
    sigma=st.floats(min_value=1e-3, max_value=100),
    points=st.integers(3, 5_000_000),
)
def test_every_kind_and_direction_round_trips_exactly(
    kind: str, direction: str, mean: float, std: float, sigma: float, points: int
) -> None:
    model = MODEL_CLASSES[kind](mean, std, sigma, direction)  # type: ignore[arg-type]
    stored = ModelVersion("s", 3, model, points, CREATED)
    back = ModelVersion.from_redis("s", 3, stored.to_redis())
    assert back == stored
    assert back.model.kind == kind


@pytest.mark.parametrize(
    ("raw", "kind", "direction"),
    [
        ('[1.5,0.5,3.0,"ab",10,1796217645,"seasonal"]', "seasonal", "both"),
        ('[1.5,0.5,3.0,"a",10,1796217645,"multiscale"]', "multiscale", "above"),
        ('[1.5,0.5,3.0,"b",10,1796217645]', "static", "below"),
    ],
)
def test_the_form_written_before_kinds_had_a_letter_is_still_read(
    raw: str, kind: str, direction: str
) -> None:
    found = ModelVersion.from_redis("s", 1, raw)
    assert (found.model.kind, found.model.direction, found.points_used) == (kind, direction, 10)


@pytest.mark.parametrize("kind", sorted(MODEL_CLASSES))
def test_typical_models_of_every_kind_stay_within_a_packed_hash_value(kind: str) -> None:
    rng = np.random.default_rng(0)
    for _ in range(500):
        values = rng.normal(50, 5, 32)
        model = MODEL_CLASSES[kind](float(values.mean()), float(values.std()), 3.0, "both")
        assert len(ModelVersion("s", 1, model, 32, CREATED).to_redis()) <= 64
