"""The registry of detector kinds: a stored model's ``kind`` names its class."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from detector.kinds.static import StaticModel


@dataclass(frozen=True, slots=True)
class MultiscaleModel(StaticModel):
    """The ``multiscale`` kind (``detector.kinds.multiscale``): its streaming state lives per series
    in Redis (``detector.state.multiscale``) and its initial state in PostgreSQL
    (``model_versions.params``). The fields here are the training data's μ, σ and the fit's k
    and direction: the stateless rule that ``POST /predict``, the batch endpoint, ``/plot`` and
    readings pinned to this version use, since a single call has no stream context."""

    kind: ClassVar[str] = "multiscale"


MODEL_KINDS: dict[str, type[StaticModel]] = {"static": StaticModel, "multiscale": MultiscaleModel}
ModelKind = Literal["static", "multiscale"]


def model_from_dict(data: dict[str, Any]) -> StaticModel:
    """Rebuild a model from its stored form (JSON in Redis, a row in PostgreSQL)."""
    kind = data.get("kind", "static")
    cls = MODEL_KINDS[kind]
    return cls(
        mean=float(data["mean"]),
        std=float(data["std"]),
        sigma=float(data["sigma"]),
        direction=data["direction"],
    )
