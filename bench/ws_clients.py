"""Many WebSocket clients in one process: each subscribes to one meter and times what it is sent.

    python -m bench.ws_clients --url ws://…/ws?token=T --devices ID,ID,… --out FILE

Client i sends `subscribe_device` for devices[i % len(devices)], waits for `subscribed`; once all are
in, prints `ready`. Every `device_update` received is timed: now - the reading's timestamp (the
publisher's wall clock at publish, same machine), i.e. publish → bridge → commit → API → dashboard.
On SIGTERM it writes a JSON summary to FILE.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import signal
import sys
import time
from datetime import datetime
from typing import Any

import orjson
import websockets

from bench.stats import percentiles


class Tally:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.updates = 0
        self.other: dict[str, int] = {}
        self.closed = 0
        self.worst: dict[int, float] = {}  # per second of arrival: the slowest update (where a stall was)


async def client(url: str, device: str, tally: Tally, ready: asyncio.Event, stop: asyncio.Event) -> None:
    try:
        async with websockets.connect(url, max_queue=None, open_timeout=60, ping_interval=None) as ws:
            await ws.send(orjson.dumps({"type": "subscribe_device", "deviceId": device}).decode())
            async for raw in ws:
                msg = orjson.loads(raw)
                kind = msg.get("type")
                if kind == "subscribed":
                    ready.set()
                elif kind == "device_update":
                    now = time.time()
                    stamp = msg.get("timestamp") or (msg.get("data") or {}).get("timestamp")
                    tally.updates += 1
                    if isinstance(stamp, str):
                        took = now - datetime.fromisoformat(stamp).timestamp()
                        tally.latencies.append(took)
                        second = int(now)
                        tally.worst[second] = max(took, tally.worst.get(second, 0.0))
                else:
                    tally.other[str(kind)] = tally.other.get(str(kind), 0) + 1
                if stop.is_set():
                    break
    except Exception as exc:
        tally.other[f"closed: {type(exc).__name__}"] = tally.other.get(f"closed: {type(exc).__name__}", 0) + 1
        tally.closed += 1
    finally:
        ready.set()


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    devices = args.devices.split(",")
    tally = Tally()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    tasks = []
    started = time.monotonic()
    for i in range(args.clients):
        ready = asyncio.Event()
        tasks.append(asyncio.create_task(client(args.url, devices[i % len(devices)], tally, ready, stop)))
        # connect in waves so the server's accept queue is not the bottleneck being measured
        if i % 50 == 49:
            await ready.wait()
    connect_s = time.monotonic() - started
    await asyncio.sleep(1.0)
    print("ready", flush=True)
    await stop.wait()
    for t in tasks:
        t.cancel()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)
    return {
        "clients": args.clients,
        "connect_seconds": connect_s,
        "updates": tally.updates,
        "closed": tally.closed,
        "other": tally.other,
        "latency": percentiles(tally.latencies),
        "worst_per_second_ms": [[s, round(v * 1000)] for s, v in sorted(tally.worst.items())],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ws_clients")
    p.add_argument("--url", required=True)
    p.add_argument("--devices", required=True)
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    summary = asyncio.run(main_async(args))
    with open(args.out, "w") as f:
        json.dump(summary, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
