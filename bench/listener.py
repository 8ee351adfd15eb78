"""Publish → committed latency, read from the bridge's own `telemetry/committed` notes.

The bridge publishes one note per batch right after the batch's COMMIT returned. For every record of
ours in a note, latency = the note's arrival here - the reading's `timestamp` (the publisher's wall
clock at publish; same machine, same clock). That is an upper bound of publish → commit by one broker
hop (sub-millisecond on loopback). The database's `received_at` (now() = transaction *start*) gives
the matching lower bound; the benchmark reports both.

    python -m bench.listener --port P --prefix bm1 --out FILE

prints `ready` once subscribed; on SIGTERM writes a JSON summary to FILE and exits: the latency over
every message, and over those published after the warm-up (`WARMUP_S`, the steady state).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from array import array
from datetime import datetime
from itertools import chain
from typing import Any

import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from bench.stats import percentiles

# The first seconds of a run are the fleet's first messages: every meter registers (a devices row, its
# first latest-state row), several times the work of a steady reading; a fleet in service did that once.
WARMUP_S = 5.0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.listener")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--prefix", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--warmup", type=float, default=WARMUP_S, help="seconds left out of the steady-state figures")
    args = p.parse_args(argv)

    latencies = array("d")
    stamps = array("d")  # publish times, to tell the warm-up from the steady state
    seen: set[int] = set()
    repeats = 0
    notes = 0
    lock = threading.Lock()
    stop = threading.Event()

    def on_connect(client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        client.subscribe("telemetry/committed", qos=0)

    def on_subscribe(client: mqtt.Client, userdata: Any, mid: int, reasons: Any, properties: Any) -> None:
        print("ready", flush=True)

    def on_message(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        nonlocal repeats, notes
        arrived = time.time()
        note = orjson.loads(msg.payload)
        with lock:
            notes += 1
            # the meter readings' columns directly (bridge.committed): no dict per record
            block = note.get("meterReadings") or {}
            pairs = [(r.get("deviceId", ""), r.get("ts")) for r in note.get("records", ())]
            for device, stamp in chain(pairs, zip(block.get("deviceId", ()), block.get("ts", ()), strict=True)):
                if not device.startswith(args.prefix) or not isinstance(stamp, str):
                    continue
                key = hash((device, stamp))
                if key in seen:
                    repeats += 1  # a redelivery the bridge stored once (its primary key absorbed it)
                    continue
                seen.add(key)
                published = datetime.fromisoformat(stamp).timestamp()
                stamps.append(published)
                latencies.append(arrived - published)

    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"{args.prefix}-listener")
    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.connect(args.host, args.port)
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    client.loop_start()
    stop.wait()
    client.disconnect()
    client.loop_stop()
    with lock:
        start = min(stamps, default=0.0) + args.warmup
        summary = {
            "notes": notes,
            "records": len(latencies),
            "repeats": repeats,
            "latency": percentiles(list(latencies)),
            "latency_steady": percentiles([x for x, t in zip(latencies, stamps, strict=True) if t >= start]),
            "warmup_s": args.warmup,
        }
    with open(args.out, "w") as f:
        json.dump(summary, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
