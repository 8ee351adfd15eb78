"""`firmware-sim`: simulated meters, EVs (with their chargers' meters) and ESP32 pump controllers on MQTT.

The broker comes from MQTT_URL, the site's zone (for the daily load shape) from SITE_TIMEZONE.
Simulated time runs `--speed` times faster than real time but never ahead of the wall clock: a fast
run starts `--history` simulated seconds in the past (default: so that a `--duration` run ends now,
or one day for an open-ended run) and continues in real time once it has caught up.
SIGINT/SIGTERM publish `offline` for every device and disconnect.

`firmware-sim sample --help`: load a fixed sample day through the broker instead (idempotent).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson

from bridge.config import DEFAULT_MQTT_URL, MqttUrl
from bridge.errors import TelemetryError

from .devices import SimConfig, Simulation
from .model import correlations


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def _share(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError("must be between 0 and 1")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="firmware-sim", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--meters", type=_count, default=2, help="smart meters with a daily load shape (default 2)")
    p.add_argument("--vehicles", type=_count, default=1, help="EVs, each with its charger's meter (default 1)")
    p.add_argument("--pumps", type=_count, default=1, help="ESP32 pump controllers (default 1)")
    p.add_argument("--interval", type=_positive, default=5.0, help="real seconds between reports (default 5)")
    p.add_argument("--speed", type=_positive, default=1.0, help="simulated seconds per real second (default 1)")
    p.add_argument("--seed", type=int, default=1, help="same seed, same data (default 1)")
    p.add_argument("--faulty", type=_share, default=0.0, help="share of EV chargers at ~0.8 efficiency (default 0)")
    p.add_argument("--duration", type=_positive, default=None, help="real seconds to run (default: until stopped)")
    p.add_argument("--prefix", default="sim", help="device id prefix, e.g. sim → sim-meter-001 (default sim)")
    p.add_argument("--history", type=_non_negative, default=None, help="simulated seconds before now to start at")
    p.add_argument(
        "--correlations", action="store_true", help="print the vehicle → charger meter list as JSON and exit"
    )
    p.add_argument("--log-level", default="INFO")
    return p


async def _run(config: SimConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with Simulation(config) as sim:
        await sim.run(stop)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["sample"]:  # `firmware-sim sample …`: load the idempotent sample day and exit
        from .sample import main as sample

        return sample(argv[1:])
    args = parser().parse_args(argv)
    if args.correlations:
        print(orjson.dumps(correlations(args.prefix, args.vehicles)).decode())
        return 0
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        tz_name = os.environ.get("SITE_TIMEZONE") or "UTC"
        try:
            tz = ZoneInfo(tz_name)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"SITE_TIMEZONE: unknown IANA zone {tz_name!r}") from exc
        config = SimConfig(
            mqtt=MqttUrl.parse(os.environ.get("MQTT_URL") or DEFAULT_MQTT_URL),
            meters=args.meters,
            vehicles=args.vehicles,
            pumps=args.pumps,
            interval=args.interval,
            speed=args.speed,
            seed=args.seed,
            faulty=args.faulty,
            duration=args.duration,
            prefix=args.prefix,
            history=args.history,
            tz=tz,
        )
        asyncio.run(_run(config))
    except (TelemetryError, ValueError) as exc:
        print(f"firmware-sim: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
