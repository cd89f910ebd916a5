"""Serve the API with uvicorn: ``python -m api`` (one process; scale with more containers)."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys

import uvicorn
from pydantic import ValidationError

from api.app import create_app
from detector.collector import tune_collector
from detector.settings import get_settings

log = logging.getLogger("api")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may well resolve to other interfaces
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    parser.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "info"))
    args = parser.parse_args()
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        settings = get_settings()
    except ValidationError as exc:
        sys.exit(f"invalid settings: {exc}")
    if not (settings.api_keys or settings.api_read_keys) and not _loopback(args.host):
        log.warning(
            "serving %s without API keys: anyone who can reach it may fit and read every "
            "series (set API_KEYS, and API_READ_KEYS for read-only clients)",
            args.host,
        )
    tune_collector()
    uvicorn.run(
        create_app(settings),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=False,
        timeout_graceful_shutdown=20,
    )


if __name__ == "__main__":
    main()
