"""API under load: `current-block` and `performance/:vehicleId` over a database of stored readings.

The readings are COPYed straight into the tables the bridge fills (meter_readings with one energy
piece each in meter_energy, vehicle_readings, devices, correlations): loading them through the bridge
would take far longer than the measurement. Each meter and vehicle has 7 days of 1-minute readings;
the full run stores the issue's 10 million (497 meters and 497 vehicles), `--api-readings` scales the
number of devices down (the per-request work of both endpoints depends on one device's data, the index
depth on the total).

The load comes from `wrk` (C, a second process); the API is `python -m api` as deployed (one uvicorn
process).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg

from bridge import rollups

from . import profile
from .services import ROOT, Services, create_database, drop_database, free_port

WRK = shutil.which("wrk")
TOKEN = "bench-token"
PER_DEVICE = 7 * 24 * 60  # 7 days of 1-minute readings
BATCH = 50_000
# connections, and the pause (ms) before each of their requests: ~1,230 req/s at 3 ms answers, 1,000 at 6 ms
PACED = (16, 10)


@dataclass
class Loaded:
    readings: int
    rows: int  # every row written, energy pieces and devices included
    seconds: float
    rows_per_s: float
    meters: int
    vehicles: int
    estimate_10m_s: float  # 10 million readings (and their energy pieces) at the measured rate


@dataclass
class Endpoint:
    name: str
    path: str
    concurrency: int
    status: str  # ok | endpoint missing | error
    requests_per_s: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    requests: int = 0
    non_2xx: int = 0
    errors: str = ""
    pause_ms: float = 0.0  # each connection waits this long before each request (a paced run), else 0


@dataclass
class ApiResult:
    loaded: Loaded | None = None
    endpoints: list[Endpoint] = field(default_factory=list)
    api_rss_mb: float = 0.0
    plans: dict[str, Any] = field(default_factory=dict)  # EXPLAIN ANALYZE of each endpoint's query
    profiles: dict[str, Any] = field(default_factory=dict)  # py-spy of the API during the busiest run
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def load(db_url: str, readings: int) -> Loaded:
    """COPY at least `readings` readings (half meters, half vehicles), ending now, into a migrated database."""
    n = max(1, -(-readings // (2 * PER_DEVICE)))
    end = datetime.now(UTC).replace(second=0, microsecond=0)
    start = end - timedelta(minutes=PER_DEVICE - 1)
    meters = [f"apim-{i}" for i in range(n)]
    vehicles = [f"apiv-{i}" for i in range(n)]
    rows = 0
    t0 = time.monotonic()
    with psycopg.connect(db_url) as conn:
        with (
            conn.cursor() as cur,
            cur.copy("COPY devices (device_id, kind, status, first_seen, last_seen) FROM STDIN") as cp,
        ):
            for d in meters:
                cp.write_row((d, "meter", "online", start, end))
            for d in vehicles:
                cp.write_row((d, "vehicle", "online", start, end))
        with conn.cursor() as cur, cur.copy("COPY meter_vehicle_correlations (vehicle_id, meter_id) FROM STDIN") as cp:
            for v, m in zip(vehicles, meters, strict=True):
                cp.write_row((v, m))
        rows += 3 * n
        conn.commit()
        for i, (m, v) in enumerate(zip(meters, vehicles, strict=True)):
            rows += _device_history(conn, m, v, start, seed=i)
            conn.commit()
        # rows COPYed around the bridge: the hourly rollups are summed again, as after any bulk load
        for sql in rollups.REBUILD:
            conn.execute(sql)
        conn.commit()
        # the measured load must not share the machine with the aftermath of a 15 M-row COPY: autovacuum
        # would scan every freshly inserted row, and the checkpoint write every dirty page, during wrk
        conn.autocommit = True
        conn.execute("VACUUM (ANALYZE)")
        conn.execute("CHECKPOINT")
    seconds = time.monotonic() - t0
    total_readings = 2 * n * PER_DEVICE
    rate = rows / seconds
    per_reading = rows / total_readings
    return Loaded(total_readings, rows, seconds, rate, n, n, 10_000_000 * per_reading / rate)


def _device_history(conn: psycopg.Connection[Any], meter: str, vehicle: str, start: datetime, seed: int) -> int:
    power = [20.0 + ((seed * 7 + k) % 60) for k in range(PER_DEVICE)]
    stamps = [start + timedelta(minutes=k) for k in range(PER_DEVICE)]
    with conn.cursor() as cur:
        with cur.copy(
            "COPY meter_readings (meter_id, ts, power_kw, voltage, current, frequency, power_factor) FROM STDIN"
        ) as cp:
            for ts, p in zip(stamps, power, strict=True):
                cp.write_row((meter, ts, p, 230.0, p * 4.35, 50.0, 0.97))
        # one piece per reading: its 1-minute hold lies in its own block
        with cur.copy("COPY meter_energy (meter_id, ts, source_ts, kwh, power_kw, is_reading) FROM STDIN") as cp:
            for ts, p in zip(stamps, power, strict=True):
                block = ts.replace(minute=ts.minute // 30 * 30)
                cp.write_row((meter, block, ts, p / 60.0, p, True))
        with cur.copy("COPY vehicle_readings (vehicle_id, ts, soc, kwh_delivered_dc, battery_temp) FROM STDIN") as cp:
            for k, ts in enumerate(stamps):
                cp.write_row((vehicle, ts, 20 + k % 80, power[k] / 60.0 * 0.9, 25.0 + k % 10))
    return 3 * PER_DEVICE


def _start_api(svc: Services, db_url: str, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": db_url,
        "MQTT_URL": svc.mqtt_url,
        "API_TOKENS": TOKEN,
        "API_HOST": "127.0.0.1",
        "API_PORT": str(port),
        "SITE_TIMEZONE": "UTC",
    }
    out = open(log, "wb")
    proc = subprocess.Popen([sys.executable, "-m", "api"], cwd=ROOT, env=env, stdout=out, stderr=out)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the API exited: {log.read_text(errors='replace')[-2000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(base + "/api/health", timeout=2).status_code < 500:
                return proc, base
        time.sleep(0.2)
    proc.terminate()
    raise RuntimeError(f"the API did not answer within 30 s: {log.read_text(errors='replace')[-2000:]}")


def probe(base: str, path: str, keys: set[str]) -> str:
    """`ok` when the endpoint answers 200 with the contract's fields, else why not."""
    try:
        r = httpx.get(base + path, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    except httpx.HTTPError as exc:
        return f"error: {exc!r}"
    if r.status_code == 404 and "json" not in r.headers.get("content-type", ""):
        return "endpoint missing"
    if r.status_code != 200:
        return f"error: HTTP {r.status_code} {r.text[:200]}"
    missing = keys - set(r.json())
    return f"error: fields missing {sorted(missing)}" if missing else "ok"


_LUA = """
local ids = {%s}
local n = 0
request = function()
  n = n + 1
  local path = string.gsub("%s", "{id}", ids[(n %% #ids) + 1])
  return wrk.format("GET", path, {["Authorization"] = "Bearer %s"})
end
"""
# a paced run: wrk calls delay() before each request of a connection (the wait is not in its latency)
_PAUSE = """
delay = function()
  return %d
end
"""


def _ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        return float("nan")
    value, unit = float(m[1]), m[2]
    return value * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def wrk(base: str, name: str, path: str, ids: list[str], concurrency: int, seconds: int, pause_ms: int = 0) -> Endpoint:
    result = Endpoint(name, path, concurrency, "ok", pause_ms=pause_ms)
    if WRK is None:
        result.status = "error: wrk not installed (apt-get install wrk)"
        return result
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(_LUA % (", ".join(f'"{i}"' for i in ids), path, TOKEN))
        if pause_ms:
            f.write(_PAUSE % pause_ms)
        script = f.name
    threads = min(2, concurrency)
    args = [WRK, f"-t{threads}", f"-c{concurrency}", f"-d{seconds}s", "--latency", "-s", script, base + "/"]
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 60).stdout
    finally:
        os.unlink(script)
    if m := re.search(r"Requests/sec:\s+([\d.]+)", out):
        result.requests_per_s = float(m[1])
    if m := re.search(r"(\d+) requests in", out):
        result.requests = int(m[1])
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        result.non_2xx = int(m[1])
    if m := re.search(r"Socket errors: (.*)", out):
        result.errors = m[1]
    if m := re.search(r"^\s+50%\s+(\S+)", out, re.M):
        result.p50_ms = _ms(m[1])
    if m := re.search(r"^\s+99%\s+(\S+)", out, re.M):
        result.p99_ms = _ms(m[1])
    if m := re.search(r"Latency\s+\S+\s+\S+\s+(\S+)", out):
        result.max_ms = _ms(m[1])
    if result.non_2xx:
        result.status = f"error: {result.non_2xx} non-2xx answers"
    return result


def explain(db_url: str) -> dict[str, Any]:
    """The endpoints' own SQL (imported from the API), EXPLAIN ANALYZEd for one device."""
    out: dict[str, Any] = {}
    since = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=23)
    try:
        from api import eie, ems
        from bridge.energy import block_start
    except Exception as exc:  # the API being incomplete must not stop the benchmark
        return {"error": f"cannot import the API's queries: {exc!r}"}
    cases: dict[str, tuple[str | None, Any]] = {
        "current-block": (
            getattr(ems, "_BLOCK_AT", None),
            {"id": "apim-0", "start": block_start(datetime.now(UTC))},
        ),
        "performance": (
            getattr(eie, "_PERFORMANCE", None),
            {"id": "apiv-0", "since": since, "raw_from": since},
        ),
    }
    with psycopg.connect(db_url, autocommit=True) as conn:
        # as the API asks once it has seen where the hourly rollups end
        (done,) = conn.execute("SELECT done_until FROM rollup_state").fetchone() or (since,)
        cases["performance"][1]["raw_from"] = max(since, done)
        for name, (sql, params) in cases.items():
            if not sql:
                out[name] = {"error": "query not found in the API module"}
                continue
            try:
                conn.execute(sql, params).fetchall()  # warm the cache as the load will
                rows = conn.execute("EXPLAIN (ANALYZE, BUFFERS) " + sql, params).fetchall()
            except psycopg.Error as exc:  # a query the benchmark cannot call must not cost the load numbers
                out[name] = {"error": f"{type(exc).__name__}: {exc}"}
                continue
            lines = [r[0] for r in rows]
            ms = next((float(x.split(":")[1].split()[0]) for x in lines if x.startswith("Execution Time")), None)
            out[name] = {"execution_ms": ms, "plan": lines[:150]}
    return out


def run(svc: Services, readings: int, seconds: int = 15, concurrency: tuple[int, ...] = (8, 64)) -> ApiResult:
    result = ApiResult()
    db_url = create_database(svc.admin_url)
    work = Path(tempfile.mkdtemp(prefix="bench-api-"))
    try:
        result.loaded = load(db_url, readings)
        result.plans = explain(db_url)
        api, base = _start_api(svc, db_url, work / "api.log")
        try:
            n = result.loaded.meters
            meters = [f"apim-{i}" for i in range(n)]
            vehicles = [f"apiv-{i}" for i in range(n)]
            targets = [
                ("current-block", "/api/meters/{id}/current-block", meters,
                 {"deviceId", "start", "end", "isPeakHour", "totalKwh", "readingCount"}),
                ("performance", "/v1/analytics/performance/{id}", vehicles,
                 {"vehicleId", "period", "totalKwhConsumedAc", "totalKwhDeliveredDc", "efficiencyRatio",
                  "averageBatteryTemp", "recordCount"}),
            ]  # fmt: skip
            for name, path, ids, keys in targets:
                status = probe(base, path.replace("{id}", ids[0]), keys)
                if status != "ok":
                    result.endpoints.append(Endpoint(name, path, 0, status))
                    continue
                for c in concurrency:
                    spy = None
                    if c == max(concurrency):
                        spy = profile.record(api.pid, max(1, seconds - 3), work / f"pyspy-{name}.txt")
                    result.endpoints.append(wrk(base, name, path, ids, c, seconds))
                    if spy is not None:
                        result.profiles[name] = spy.finish()
                # the target's rate rather than the API's maximum: p99 at about 1,000-1,600 req/s
                result.endpoints.append(wrk(base, name, path, ids, PACED[0], seconds, pause_ms=PACED[1]))
            with contextlib.suppress(Exception):
                import psutil

                result.api_rss_mb = psutil.Process(api.pid).memory_info().rss / 2**20
        finally:
            api.terminate()
            try:
                api.wait(15)
            except subprocess.TimeoutExpired:
                api.kill()
    except Exception as exc:  # report, do not abort the other modes
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        drop_database(svc.admin_url, db_url)
        shutil.rmtree(work, ignore_errors=True)
    return result
