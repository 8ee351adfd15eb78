"""WebSocket fan-out: N dashboards on /ws, each following one meter, while the meters report.

The whole path is real: publisher process → broker → `python -m bridge` → commit → its
`telemetry/committed` note → `python -m api` (hub) → WebSocket → client process. With N clients on N
meters reporting once a second, the API relays N updates/s.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from . import api_load, ingest
from .services import ROOT, Services, create_database, drop_database


@dataclass
class WsResult:
    status: str = "ok"
    clients: int = 0
    rate: float = 0.0
    seconds: float = 0.0
    published: int = 0
    delivered: int = 0
    closed: int = 0
    connect_seconds: float = 0.0
    latency: dict[str, float] = field(default_factory=dict)
    other: dict[str, int] = field(default_factory=dict)
    worst_per_second_ms: list[list[int]] = field(default_factory=list)  # [unix second, slowest update ms]
    api_rss_mb: float = 0.0
    api_cpu_pct: float = 0.0
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _probe(url: str) -> str | None:
    """None when /ws accepts a connection; else why not ("endpoint missing" for a 404)."""
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    try:
        with connect(url, open_timeout=10):
            return None
    except InvalidStatus as exc:
        return "endpoint missing" if exc.response.status_code == 404 else f"error: HTTP {exc.response.status_code}"
    except Exception as exc:
        return f"error: {exc!r}"


def run(svc: Services, clients: int = 1000, seconds: float = 30.0) -> WsResult:
    result = WsResult(clients=clients, rate=float(clients), seconds=seconds)
    db_url = create_database(svc.admin_url)
    work = Path(tempfile.mkdtemp(prefix="bench-ws-"))
    prefix = f"w{uuid.uuid4().hex[:6]}"
    procs: list[subprocess.Popen[Any]] = []
    bridge_id = f"{prefix}-bridge"
    try:
        bridge = ingest.start_bridge(svc, db_url, bridge_id, work / "bridge.log", None, ingest.BRIDGE_CMD, {})
        procs.append(bridge)
        api, base = api_load._start_api(svc, db_url, work / "api.log")
        procs.append(api)
        devices = [f"{prefix}-0-{j}" for j in range(clients)]
        url = base.replace("http://", "ws://") + f"/ws?token={api_load.TOKEN}"
        missing = _probe(url)
        if missing:
            result.status = missing
            return result
        out = work / "ws.json"
        ws = subprocess.Popen(
            [sys.executable, "-m", "bench.ws_clients", "--url", url, "--devices", ",".join(devices),
             "--clients", str(clients), "--out", str(out)],
            cwd=ROOT, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        procs.append(ws)
        assert ws.stdout is not None
        line = ws.stdout.readline().strip()
        if line != "ready":
            raise RuntimeError(f"WebSocket clients did not connect (got {line!r})")
        api_proc = psutil.Process(api.pid)
        cpu0 = sum(api_proc.cpu_times()[:2])
        t0 = time.monotonic()
        load = ingest.Load(
            publishers=1, meters=clients, rate=float(clients), duration=seconds, count=int(clients * seconds)
        )
        (pub,) = ingest.start_publishers(svc, prefix, load)
        report = json.loads(pub.communicate(timeout=seconds + 120)[0].strip().splitlines()[-1])
        result.published = int(report["published"])
        time.sleep(3.0)  # the last commits and relays
        result.api_cpu_pct = round(100 * (sum(api_proc.cpu_times()[:2]) - cpu0) / (time.monotonic() - t0), 1)
        result.api_rss_mb = api_proc.memory_info().rss / 2**20
        ws.terminate()
        ws.wait(30)
        summary = json.loads(out.read_text())
        result.delivered = summary["updates"]
        result.closed = summary["closed"]
        result.connect_seconds = summary["connect_seconds"]
        result.latency = summary["latency"]
        result.other = summary["other"]
        result.worst_per_second_ms = summary["worst_per_second_ms"]
    except Exception as exc:  # report, do not abort the other modes
        result.status = "error"
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        for p in reversed(procs):
            ingest._stop(p, 15)
        ingest.discard_session(svc.mqtt_url, bridge_id)
        drop_database(svc.admin_url, db_url)
        shutil.rmtree(work, ignore_errors=True)
    return result
