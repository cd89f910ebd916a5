"""The registry of detector kinds: a stored model's ``kind`` names its plugin."""

from __future__ import annotations

from typing import Any, Final, Literal

from detector.errors import InvalidInputError
from detector.kinds.base import DetectorKind, StatefulKind
from detector.kinds.multiscale import MultiscaleKind, MultiscaleModel
from detector.kinds.seasonal import SeasonalKind, SeasonalModel
from detector.kinds.static import StaticKind, StaticModel

KINDS: Final[dict[str, DetectorKind]] = {
    "static": StaticKind(),
    "seasonal": SeasonalKind(),
    "multiscale": MultiscaleKind(),
}
MODEL_CLASSES: Final[dict[str, type[StaticModel]]] = {
    "static": StaticModel,
    "seasonal": SeasonalModel,
    "multiscale": MultiscaleModel,
}
# The kinds whose stream verdicts depend on the series' history (``detector.state.series``).
STATEFUL: Final = frozenset(name for name, kind in KINDS.items() if kind.stateful)
ModelKind = Literal["static", "seasonal", "multiscale"]


def get_kind(name: str) -> DetectorKind:
    """The plugin of a kind, or InvalidInputError (a 422) naming the known ones."""
    try:
        return KINDS[name]
    except KeyError:
        raise InvalidInputError(
            f"unknown detector kind {name!r}: one of {', '.join(KINDS)}"
        ) from None


def stateful_kind(name: str) -> StatefulKind | None:
    """The plugin of a kind that keeps per-series stream state, else None."""
    kind = KINDS.get(name)
    return kind if kind is not None and kind.stateful else None  # type: ignore[return-value]


def prepare_stateful() -> None:
    """``prepare`` every stateful kind (blocking: run it in a thread)."""
    for name in sorted(STATEFUL):
        kind = stateful_kind(name)
        if kind is not None:
            kind.prepare()


def model_from_dict(data: dict[str, Any]) -> StaticModel:
    """Rebuild a model from its stored form (JSON in Redis, a row in PostgreSQL)."""
    cls = MODEL_CLASSES[data.get("kind", "static")]
    return cls(
        mean=float(data["mean"]),
        std=float(data["std"]),
        sigma=float(data["sigma"]),
        direction=data["direction"],
    )
