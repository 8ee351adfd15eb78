"""`python -m bridge` runs the bridge until SIGINT/SIGTERM; `python -m bridge demo` runs the whole system."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from .config import Settings
from .errors import TelemetryError
from .runtime import tune_gc
from .service import Bridge


async def _run(settings: Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await Bridge(settings).run(stop)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "demo" in argv:
        from .demo import main as demo  # its imports (API, broker, embedded database) only when asked for

        i = argv.index("demo")
        return demo(argv[:i] + argv[i + 1 :])
    parser = argparse.ArgumentParser(prog="python -m bridge", description=__doc__)
    parser.add_argument(
        "command", nargs="?", default="run", choices=["run", "demo"], help="what to run (default: run; demo --help)"
    )
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = Settings.from_env()
        tune_gc()
        asyncio.run(_run(settings))
    except TelemetryError as exc:
        print(f"bridge: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
