"""The service's own app plus baseline routes, served by the same uvicorn for fair ratios."""

from __future__ import annotations

import argparse
import logging
from typing import Annotated

import uvicorn
from fastapi import Depends, FastAPI, Response

from api.app import create_app
from api.deps import SeriesIdDep, json_body
from api.schemas import PredictRequest

_CONSTANT = b'{"anomaly":false,"model_version":"v1.0.0"}'


def bench_app() -> FastAPI:
    app = create_app()

    @app.post("/baseline/predict/{series_id}", include_in_schema=False)
    async def baseline_predict(
        series_id: SeriesIdDep,
        body: Annotated[PredictRequest, Depends(json_body(PredictRequest))],
    ) -> Response:
        """Validates the same id and JSON body as /predict, then answers a constant."""
        return Response(_CONSTANT, media_type="application/json")

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    uvicorn.run(
        bench_app(), host="127.0.0.1", port=args.port, log_level="warning", access_log=False
    )


if __name__ == "__main__":
    main()
