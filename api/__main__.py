"""`python -m api` serves the API with uvicorn on API_HOST:API_PORT (default 127.0.0.1:8000)."""

from __future__ import annotations

import logging
import sys

import uvicorn

from bridge.errors import TelemetryError
from bridge.runtime import tune_gc

from .app import create_app
from .config import ApiSettings


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = ApiSettings.from_env()
    except TelemetryError as exc:
        print(f"api: {exc}", file=sys.stderr)
        return 2
    tune_gc()
    # uvloop and httptools (dependencies) are picked up by uvicorn's "auto" loop and HTTP parser
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level="info",
        access_log=settings.access_log,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
