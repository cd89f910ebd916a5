"""The benchmark's two servers, run by the same uvicorn settings for fair ratios:
``python -m bench.app --port N`` serves the service's own app; with ``--baseline``, a bare
FastAPI app that validates the same predict body with the same model and answers a constant
(no middleware, no store, no metrics)."""

from __future__ import annotations

import argparse
import logging

import uvicorn
from fastapi import FastAPI, Request, Response

from api.app import create_app
from api.deps import parse_json_body
from api.schemas import PredictRequest
from detector.collector import tune_collector
from detector.identifiers import validate_series_id

_CONSTANT = b'{"anomaly":false,"model_version":"v1.0.0"}'


def baseline_app() -> FastAPI:
    """What any FastAPI app answering ``POST /predict/{series_id}`` costs at least."""
    app = FastAPI()

    @app.post("/predict/{series_id}")
    async def baseline_predict(series_id: str, request: Request) -> Response:
        """Validates the same id and JSON body as /predict, then answers a constant."""
        await parse_json_body(PredictRequest, await request.body())
        validate_series_id(series_id)
        return Response(_CONSTANT, media_type="application/json")

    @app.get("/healthcheck")
    async def healthcheck() -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--baseline", action="store_true", help="serve the bare baseline app")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.baseline:
        app = baseline_app()
    else:
        app = create_app()
        tune_collector()  # as `python -m api` does
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
