"""`python -m bench`: the performance benchmark of issue 6, in one run, side by side.

It starts its own Mosquitto and PostgreSQL 15 + TimescaleDB (free loopback ports, state in a temporary
directory, both stopped at the end) and measures, in this order:

  ceilings   the broker alone (mosquitto_pub → mosquitto_sub, and our publishers → mosquitto_sub)
             and the database alone (COPY of the same rows into the same hypertable)
  naive      bench/naive.py: paho, one INSERT + COMMIT per message
  latency    our bridge at a fixed 5,000 msg/s: publish → committed p50/p99/max
  latency1k  the same at 1,000 msg/s (below its capacity: the latency of batching alone)
  latency2   5,000 msg/s into two bridges partitioned by device (BRIDGE_PARTITION 0/2 and 1/2)
  sustained  our bridge offered 21,000 msg/s for 60 s (the target is 20,000 committed: see report.py)
  sustained2 the same into two bridges partitioned by device
  overload   publishers as fast as they can: our bridge's maximum, its RSS, nothing dropped (profiled)
  shared     two bridges on one $share subscription (BRIDGE_SHARED_GROUP), same load as overload
  partitioned two bridges, each storing half of the devices (BRIDGE_PARTITION 0/2 and 1/2), same load
             (these three in turn, `--rounds` times, 5 by default: compared round by round)
  api        `current-block` and `performance/:vehicleId` under wrk, over a scaled-down reading store
  ws         1,000 WebSocket clients on /ws, 1,000 updates/s relayed

Every mode is bounded in time. Results: printed, and written to bench/RESULTS.md (full run) and
`--json FILE`. `--quick` runs small versions of the ingest modes in seconds, for the CI smoke test,
which asserts only correctness (nothing lost, nothing doubled).

    .venv/bin/python -m bench                      # the full run (~25 minutes)
    .venv/bin/python -m bench --quick --json out.json
    .venv/bin/python -m bench --modes latency,overload --no-results
    .venv/bin/python -m bench --mqtt-url mqtt://… --pg-admin-url postgresql://…   # use running services
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bridge.energy import BLOCK, MAX_HOLD

from . import api_load, ceilings, ingest, report, ws_load
from .services import Services, create_database, drop_database, own_services, start_broker, stop_process

INGEST_MODES = (
    "naive",
    "latency",
    "latency1k",
    "latency2",
    "sustained",
    "sustained2",
    "overload",
    "shared",
    "partitioned",
)
MODES = ("ceilings", *INGEST_MODES, "api", "ws")
QUICK_MODES = ("ceilings", "naive", "latency", "overload", "shared", "partitioned")
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"

# The modes compared with each other at their maximum. A power reading in the last 5 minutes of a
# 30-minute block holds into the next one, so it is stored as two energy pieces instead of one (see
# bridge/energy.py): a run inside those minutes writes ~2x the pieces (measured: 1.81 M rows for 0.90 M
# readings, its pieces insert 45 vs 25 ms a batch), so it does more work than a run outside them.
# Each of these runs starts only where it ends before the next such 5 minutes; the readings carry their
# publish time, so the wait cannot be avoided by shifting them.
COMPARED = ("overload", "shared", "partitioned")
COMPARED_SECONDS = 60.0  # one compared run, publishing to verified (~42 s measured), with room


def full_plan(args: argparse.Namespace) -> dict[str, Any]:
    meters = args.meters
    return {
        "ceilings": {"broker_count": 300_000, "db_count": 300_000},
        "naive": ingest.Load(publishers=2, meters=meters, count=20_000),
        "latency": ingest.Load(publishers=2, meters=meters, rate=5_000, duration=30, count=150_000),
        "latency1k": ingest.Load(publishers=2, meters=meters, rate=1_000, duration=20, count=20_000),
        "latency2": ingest.Load(publishers=2, meters=meters, rate=5_000, duration=30, count=150_000),
        "sustained": ingest.Load(
            publishers=2, meters=meters, rate=report.SUSTAINED_OFFER, duration=60, count=1_260_000
        ),
        "sustained2": ingest.Load(
            publishers=2, meters=meters, rate=report.SUSTAINED_OFFER, duration=60, count=1_260_000
        ),
        "overload": ingest.Load(publishers=2, meters=meters, duration=30, count=3_000_000),
        "shared": ingest.Load(publishers=2, meters=meters, duration=30, count=3_000_000),
        "partitioned": ingest.Load(publishers=2, meters=meters, duration=30, count=3_000_000),
        "backlog_limit": 200_000,
        "drain_timeout": 240.0,
        "profile_seconds": 20.0,
        "api_readings": args.api_readings,
        "ws_clients": 1000,
        "ws_seconds": 30.0,
    }


def quick_plan(args: argparse.Namespace) -> dict[str, Any]:
    meters = min(args.meters, 500)
    return {
        "ceilings": {"broker_count": 20_000, "db_count": 20_000},
        "naive": ingest.Load(publishers=2, meters=meters, count=1_000),
        "latency": ingest.Load(publishers=2, meters=meters, rate=1_000, duration=3, count=3_000),
        "overload": ingest.Load(publishers=2, meters=meters, count=8_000),
        "shared": ingest.Load(publishers=2, meters=meters, count=6_000),
        "partitioned": ingest.Load(publishers=2, meters=meters, count=6_000),
        "backlog_limit": 0,
        "drain_timeout": 60.0,
        "profile_seconds": 0.0,
    }


@contextlib.contextmanager
def services(args: argparse.Namespace) -> Iterator[Services]:
    """Ours, unless both URLs are given; with only the database URL, our own broker beside it."""
    base = Path(tempfile.mkdtemp(prefix="telemetry-bench-"))
    if args.mqtt_url and args.pg_admin_url:
        yield Services(args.mqtt_url, args.pg_admin_url)
    elif args.pg_admin_url:
        broker = start_broker(base / "mosquitto")
        try:
            yield Services(broker.url, args.pg_admin_url, broker_pid=broker.pid)
        finally:
            stop_process(broker.proc)
    else:
        with own_services(base) as svc:
            yield svc


def run(args: argparse.Namespace) -> dict[str, Any]:
    plan = quick_plan(args) if args.quick else full_plan(args)
    modes = [m for m in (args.modes.split(",") if args.modes else (QUICK_MODES if args.quick else MODES))]
    unknown = set(modes) - set(MODES)
    if unknown:
        raise SystemExit(f"unknown modes: {sorted(unknown)} (known: {', '.join(MODES)})")
    out: dict[str, Any] = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "machine": report.machine(),
        "plan": {k: (v.__dict__ if isinstance(v, ingest.Load) else v) for k, v in plan.items()},
        "ingest": [],
        "ceilings": [],
    }
    bridge_cmd = shlex.split(args.bridge_cmd) if args.bridge_cmd else None
    t0 = time.monotonic()
    with services(args) as svc:
        out["versions"] = report.versions(svc)
        # quick: one database for every ingest run (each run has its own device ids); full: a fresh one each
        shared_db = create_database(svc.admin_url) if args.quick else None
        try:
            rounds = 1 if args.quick else args.rounds
            compared = [m for m in modes if m in COMPARED]
            # the compared modes run in turn, `rounds` times: the report compares them round by round, so
            # a slow or fast spell of this shared machine lands on every mode alike
            steps: list[tuple[str, int]] = []
            for mode in modes:
                if mode not in COMPARED:
                    steps.append((mode, 0))
                elif mode == compared[0]:
                    steps += [(m, i) for i in range(1, rounds + 1) for m in compared]
            for mode, round_ in steps:
                if mode in COMPARED and not args.quick:
                    wait_outside_spill(COMPARED_SECONDS)
                log(f"{mode}{f' (round {round_} of {rounds})' if round_ and rounds > 1 else ''} …")
                started = time.monotonic()
                if mode == "ceilings":
                    c = plan["ceilings"]
                    for fn, count in (
                        (ceilings.broker_c, c["broker_count"]),
                        (ceilings.broker_ours, c["broker_count"]),
                        (ceilings.database, c["db_count"]),
                    ):
                        try:
                            out["ceilings"].append(fn(svc, count).as_dict())
                        except Exception as exc:
                            out["ceilings"].append({"name": fn.__name__, "error": f"{type(exc).__name__}: {exc}"})
                elif mode in INGEST_MODES:
                    profiled = mode in args.profile.split(",") and round_ <= 1
                    r = ingest.run(
                        svc,
                        mode,
                        plan[mode],
                        consumer="naive" if mode == "naive" else "ours",
                        bridges=2 if mode in ("shared", "partitioned", "latency2", "sustained2") else 1,
                        partitioned=mode in ("partitioned", "latency2", "sustained2"),
                        backlog_limit=plan["backlog_limit"],
                        drain_timeout=plan["drain_timeout"],
                        profile_seconds=plan["profile_seconds"] if profiled else 0.0,
                        db_url=shared_db,
                        bridge_cmd=bridge_cmd,
                    )
                    out["ingest"].append({**r.as_dict(), **({"round": round_} if rounds > 1 and round_ else {})})
                elif mode == "api":
                    out["api"] = api_load.run(svc, plan.get("api_readings", 10_000_000)).as_dict()
                elif mode == "ws":
                    out["ws"] = ws_load.run(svc, plan.get("ws_clients", 1000), plan.get("ws_seconds", 30.0)).as_dict()
                log(f"{mode} done in {time.monotonic() - started:.0f} s")
        finally:
            if shared_db:
                drop_database(svc.admin_url, shared_db)
    out["seconds"] = time.monotonic() - t0
    return out


def wait_outside_spill(needed: float) -> None:
    """Until a run of `needed` seconds ends before the next 5 minutes that end a 30-minute block."""
    block, spill = BLOCK.total_seconds(), (BLOCK - MAX_HOLD).total_seconds()
    into = time.time() % block  # blocks start on :00 and :30 UTC
    if spill - into >= needed:  # negative within those minutes
        return
    wait = block - into + 2  # from the next block's start, 25 minutes without spill
    log(f"waiting {wait:.0f} s: the run would reach the last 5 minutes of a 30-minute block")
    time.sleep(wait)


def log(text: str) -> None:
    print(f"[bench {datetime.now():%H:%M:%S}] {text}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="small ingest runs in seconds (correctness only)")
    p.add_argument(
        "--rounds", type=int, default=5, help="rounds of the compared modes (overload, shared, partitioned), in turn"
    )
    p.add_argument("--modes", help=f"comma-separated subset of: {', '.join(MODES)}")
    p.add_argument("--meters", type=int, default=10_000, help="meters in the simulated fleet (default 10000)")
    p.add_argument("--api-readings", type=int, default=10_000_000, help="readings stored for the API load")
    p.add_argument("--json", help="also write the raw results to this file")
    p.add_argument("--profile", default="overload", help="ingest modes to profile (py-spy, pg_stat_statements)")
    p.add_argument("--results", default=str(RESULTS), help="markdown report (default bench/RESULTS.md)")
    p.add_argument("--no-results", action="store_true", help="do not write the markdown report")
    p.add_argument("--mqtt-url", default=os.environ.get("BENCH_MQTT_URL"), help="use this broker instead of our own")
    p.add_argument("--pg-admin-url", default=os.environ.get("BENCH_PG_ADMIN_URL"), help="use this PostgreSQL")
    p.add_argument("--bridge-cmd", help="run this instead of `python -m bridge` (to measure a candidate change)")
    p.add_argument("--render", metavar="JSON", help="only rewrite the report from a saved --json file")
    args = p.parse_args(argv)
    if args.render:
        Path(args.results).write_text(report.markdown(json.loads(Path(args.render).read_text())))
        log(f"wrote {args.results}")
        return 0
    out = run(args)
    text = report.markdown(out)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    if not args.quick and not args.no_results:
        Path(args.results).write_text(text)
        log(f"wrote {args.results}")
    bad = [r for r in out["ingest"] if r["lost"] or r["doubled"] or r["extra"] or r["timed_out"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
