"""End-to-end ingest runs: publisher processes → broker → a bridge (ours or the naive one) → database.

One run: a fresh migrated database, the bridge(s) as subprocesses (`python -m bridge` exactly as
deployed, or `python -m bench.naive`), the latency listener, several publisher processes; then wait
until every acknowledged message is a committed row, and check that each (meter_id, ts) published is
stored exactly once.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import psutil
import psycopg
from paho.mqtt.enums import CallbackAPIVersion

from bridge.config import MqttUrl, session_id
from bridge.schema import COUNTER_TOTAL

from . import profile
from .services import ROOT, Services, create_database, drop_database, free_port

PY = sys.executable
BRIDGE_CMD = [PY, "-m", "bridge"]


@dataclass
class Load:
    """What the publishers do: `rate` msg/s in total (0 = as fast as they can), for `duration` s or `count` msgs."""

    publishers: int = 2
    meters: int = 2000  # in total, split between the publishers
    rate: float = 0.0
    duration: float = 0.0
    count: int = 1_000_000


@dataclass
class IngestResult:
    name: str
    consumer: str
    bridges: int
    load: dict[str, Any]
    published: int = 0
    acked: int = 0
    publish_seconds: float = 0.0
    publish_rate: float = 0.0
    seconds: float = 0.0  # first publish → last row committed
    rate: float = 0.0
    lag_seconds: float = 0.0  # last publish → last row committed
    rows: int = 0
    distinct: int = 0
    lost: int = 0
    doubled: int = 0
    extra: int = 0
    redelivered: int | None = None
    latency: dict[str, float] = field(default_factory=dict)  # note arrival - publish (upper bound)
    latency_steady: dict[str, float] = field(default_factory=dict)  # the same, after the listener's warm-up
    warmup_s: float = 0.0
    latency_db: dict[str, float] = field(default_factory=dict)  # transaction start - publish (lower bound)
    per_second: dict[str, Any] = field(default_factory=dict)
    rss_mb: dict[str, float] = field(default_factory=dict)
    broker_rss_mb: dict[str, float] = field(default_factory=dict)
    rss_trace: list[tuple[float, float]] = field(default_factory=list)
    committed: int = 0
    stopped_early: bool = False  # publishers stopped at the backlog limit
    pauses: int = 0  # times the publishers were paused at the backlog limit (held between half and full)
    cpu: dict[str, float] = field(default_factory=dict)  # % of one core over the run
    broker_rss_trace: list[tuple[float, float]] = field(default_factory=list)
    pending_max: int = 0  # most messages the bridge(s) held received but not committed
    pending_trace: list[tuple[float, float]] = field(default_factory=list)
    timed_out: bool = False
    profile: dict[str, Any] | None = None
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class RssSampler(threading.Thread):
    """Samples the resident memory of some processes every `every` seconds, and the bridges' own
    `bridge_pending_messages` gauge (messages received from the broker, not yet committed)."""

    def __init__(self, pids: dict[str, list[int]], metrics: list[str], every: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.procs = {name: [psutil.Process(p) for p in pids_] for name, pids_ in pids.items()}
        self.samples: dict[str, list[tuple[float, float]]] = {name: [] for name in pids}
        self.samples["pending"] = []
        self.per_process_max = 0.0  # the largest single bridge process (RSS of several bridges is summed)
        self.metrics = metrics
        self.every = every
        self.halt = threading.Event()
        self.t0 = time.monotonic()

    def run(self) -> None:
        n = 0
        while not self.halt.is_set():
            t = time.monotonic() - self.t0
            for name, procs in self.procs.items():
                total = 0.0
                for proc in procs:
                    with contextlib.suppress(psutil.Error):
                        rss = proc.memory_info().rss / 2**20
                        total += rss
                        if name == "bridge":
                            self.per_process_max = max(self.per_process_max, rss)
                if total:
                    self.samples[name].append((t, total))
            if self.metrics and n % 4 == 0:
                pending = [_pending(url) for url in self.metrics]
                if all(p is not None for p in pending):
                    self.samples["pending"].append((t, float(sum(p for p in pending if p is not None))))
            n += 1
            self.halt.wait(self.every)

    def summary(self, name: str) -> dict[str, float]:
        s = [v for _, v in self.samples.get(name, [])]
        if not s:
            return {}
        return {"start": s[0], "max": max(s), "end": s[-1]}


def _pending(url: str) -> float | None:
    try:
        text = httpx.get(url, timeout=1.0).text
    except httpx.HTTPError:
        return None
    m = re.search(r"^bridge_pending_messages (\S+)$", text, re.M)
    return float(m[1]) if m else None


def discard_session(mqtt_url: str, client_id: str) -> None:
    """End a persistent session the bridge left in the broker, so it stops queueing for later runs."""
    url = MqttUrl.parse(mqtt_url)
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    with contextlib.suppress(Exception):
        client.connect(url.host, url.port, clean_start=True)
        client.loop_start()
        time.sleep(0.3)
        client.disconnect()
        client.loop_stop()


def _wait_line(path: Path, needle: str, proc: subprocess.Popen[Any], timeout: float) -> None:
    what = " ".join(str(a) for a in proc.args) if isinstance(proc.args, list) else str(proc.args)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and needle in path.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited ({proc.returncode}): {path.read_text(errors='replace')[-2000:]}")
        time.sleep(0.1)
    raise RuntimeError(f"{what}: no {needle!r} within {timeout:.0f} s: {path.read_text(errors='replace')[-2000:]}")


def _stop(proc: subprocess.Popen[Any], grace: float = 30.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _query(url: str, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()


def start_bridge(
    svc: Services,
    db_url: str,
    client_id: str,
    log: Path,
    shared: str | None,
    cmd: list[str],
    env: dict[str, str],
    metrics: list[str] | None = None,
) -> subprocess.Popen[Any]:
    """`python -m bridge` (or `cmd`) until it is subscribed; `metrics[0]` gets its /metrics URL."""
    metrics = metrics if metrics is not None else [""]
    full_env = {
        **os.environ,
        "DATABASE_URL": db_url,
        "MQTT_URL": svc.mqtt_url,
        "BRIDGE_CLIENT_ID": client_id,
        "SITE_TIMEZONE": "UTC",
        # its health/metrics server, on a port of its own (several bridges run at once)
        "BRIDGE_HEALTH": f"127.0.0.1:{free_port()}",
        **env,
    }
    metrics[0] = f"http://{full_env['BRIDGE_HEALTH']}/metrics"
    if shared:
        full_env["BRIDGE_SHARED_GROUP"] = shared
    out = open(log, "wb")
    proc = subprocess.Popen([*cmd, "--log-level", "INFO"], cwd=ROOT, env=full_env, stdout=out, stderr=out)
    _wait_line(log, "connected to", proc, 30)
    return proc


def start_naive(svc: Services, db_url: str, client_id: str, log: Path) -> subprocess.Popen[Any]:
    env = {**os.environ, "DATABASE_URL": db_url, "MQTT_URL": svc.mqtt_url, "NAIVE_CLIENT_ID": client_id}
    out = open(log, "wb")
    proc = subprocess.Popen([PY, "-m", "bench.naive"], cwd=ROOT, env=env, stdout=out, stderr=out)
    _wait_line(log, "subscribed", proc, 30)
    return proc


def start_publishers(
    svc: Services, prefix: str, load: Load, progress: list[Path] | None = None
) -> list[subprocess.Popen[str]]:
    port = MqttUrl.parse(svc.mqtt_url).port
    host = MqttUrl.parse(svc.mqtt_url).host
    procs = []
    for i in range(load.publishers):
        args = [
            PY, "-m", "bench.publisher", "--host", host, "--port", str(port),
            "--prefix", f"{prefix}-{i}",
            "--meters", str(max(1, load.meters // load.publishers)),
            "--count", str(max(1, load.count // load.publishers)),
            "--rate", str(load.rate / load.publishers if load.rate else 0),
            "--duration", str(load.duration),
        ]  # fmt: skip
        if progress:
            args += ["--progress", str(progress[i])]
        procs.append(subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, text=True))
    return procs


def run(
    svc: Services,
    name: str,
    load: Load,
    *,
    consumer: str = "ours",
    bridges: int = 1,
    backlog_limit: int = 0,
    drain_timeout: float = 120.0,
    profile_seconds: float = 0.0,
    db_url: str | None = None,
    bridge_env: dict[str, str] | None = None,
    bridge_cmd: list[str] | None = None,
    partitioned: bool = False,
) -> IngestResult:
    """One end-to-end run. `backlog_limit`: stop the publishers once this many published messages wait
    uncommitted (the target is missed by then; it keeps the run and the broker's queue bounded).
    `db_url`: use this migrated database instead of a fresh one (it is then kept)."""
    result = IngestResult(name=name, consumer=consumer, bridges=bridges, load=asdict(load))
    own_db = db_url is None
    db_url = db_url or create_database(svc.admin_url)
    prefix = f"b{uuid.uuid4().hex[:6]}"
    work = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    consumers: list[subprocess.Popen[Any]] = []
    client_ids = [f"{prefix}-bridge-{i}" for i in range(bridges)]
    listener: subprocess.Popen[str] | None = None
    sampler: RssSampler | None = None
    spy: profile.Recording | None = None
    reports: list[dict[str, Any]] = []
    cpu = CpuMeter()
    try:
        if profile_seconds:
            profile.reset_statements(db_url)
        shared = f"{prefix}grp" if bridges > 1 and not partitioned else None
        metric_urls = [[""] for _ in client_ids]
        for i, cid in enumerate(client_ids):
            log = work / f"consumer-{i}.log"
            env = dict(bridge_env or {})
            if partitioned:
                env["BRIDGE_PARTITION"] = f"{i}/{bridges}"
            if consumer == "ours":
                consumers.append(
                    start_bridge(svc, db_url, cid, log, shared, bridge_cmd or BRIDGE_CMD, env, metric_urls[i])
                )
            else:
                consumers.append(start_naive(svc, db_url, cid, log))
        if consumer == "ours":
            host, port = MqttUrl.parse(svc.mqtt_url).host, MqttUrl.parse(svc.mqtt_url).port
            listener = subprocess.Popen(
                [PY, "-m", "bench.listener", "--host", host, "--port", str(port), "--prefix", prefix,
                 "--out", str(work / "latency.json")],
                cwd=ROOT, stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            assert listener.stdout is not None
            if listener.stdout.readline().strip() != "ready":
                raise RuntimeError("latency listener did not subscribe")
        pids = {"bridge": [c.pid for c in consumers]}
        if svc.broker_pid:
            pids["broker"] = [svc.broker_pid]
        sampler = RssSampler(pids, [u[0] for u in metric_urls if u[0]])
        sampler.start()
        counter = Progress(db_url, consumer, prefix)
        cpu.start([c.pid for c in consumers], svc)
        t_start = time.time()
        progress = [work / f"progress-{i}" for i in range(load.publishers)]
        pubs = start_publishers(svc, prefix, load, progress)
        if profile_seconds:
            time.sleep(min(2.0, profile_seconds / 4))  # let the load ramp up first
            spy = profile.record(consumers[0].pid, profile_seconds, work / "pyspy.txt")
        # at full speed (no rate): held at the backlog limit for the whole duration, not stopped at it
        result.stopped_early, result.pauses = _watch_publishers(
            pubs, progress, load, counter, backlog_limit, hold=not load.rate
        )
        for p in pubs:
            try:
                out, _ = p.communicate(timeout=120)
                reports.append(json.loads(out.strip().splitlines()[-1]))
            except (subprocess.TimeoutExpired, IndexError, json.JSONDecodeError) as exc:
                p.kill()
                result.error = f"publisher failed: {exc!r}"
        t_published = max((r["last"] for r in reports), default=time.time())
        first = min((r["first"] for r in reports if r["first"]), default=t_start)
        result.published = sum(r["published"] for r in reports)
        result.acked = sum(r["acked"] for r in reports)
        result.publish_seconds = t_published - first
        result.publish_rate = result.published / result.publish_seconds if result.publish_seconds > 0 else 0.0
        # every acknowledged message must become a row
        t_done = counter.wait_for(result.published, drain_timeout)
        if t_done is None:
            result.timed_out = True
            t_done = time.time()
        result.seconds = t_done - first
        result.committed = counter.exact()
        result.rate = result.committed / result.seconds if result.seconds > 0 else 0.0
        result.lag_seconds = t_done - t_published
        if spy is not None:
            result.profile = spy.finish()
        time.sleep(0.5)  # the last committed note is on its way to the listener
        result.cpu = cpu.finish(reports)
        counter.close()
    finally:
        if listener is not None:
            _stop(listener, 10)
        for c in consumers:
            _stop(c)
        if sampler is not None:
            sampler.halt.set()
            sampler.join(5)
        for i, cid in enumerate(client_ids):
            # a partitioned bridge's session has an id of its own: one left behind queued every later run's
            # messages, and Mosquitto's autosave of them (2.5 s every 10 s, the whole broker stopped) showed
            # up as 1-1.4 s stalls in the WebSocket run's p99
            discard_session(svc.mqtt_url, session_id(cid, (i, bridges) if partitioned else None))
    try:
        _verify(result, db_url, prefix, reports)
        if consumer == "ours":
            summary = json.loads((work / "latency.json").read_text())
            result.latency = summary["latency"]
            result.latency_steady = summary["latency_steady"]
            result.warmup_s = summary["warmup_s"]
            result.redelivered = summary["repeats"]
        if profile_seconds and result.profile is not None:
            result.profile["statements"] = profile.top_statements(db_url)
        result.rss_mb = sampler.summary("bridge") if sampler else {}
        if sampler:
            result.rss_mb["max_per_process"] = sampler.per_process_max
        pending = sampler.samples["pending"] if sampler else []
        result.pending_max = int(max((v for _, v in pending), default=0))
        result.pending_trace = pending
        result.broker_rss_mb = sampler.summary("broker") if sampler else {}
        result.rss_trace = sampler.samples.get("bridge", []) if sampler else []
        result.broker_rss_trace = sampler.samples.get("broker", []) if sampler else []
    finally:
        if own_db:
            drop_database(svc.admin_url, db_url)
    if result.error or result.timed_out or result.lost or result.extra:
        result.error = (result.error or "") + f" (logs kept in {work})"
    else:
        shutil.rmtree(work, ignore_errors=True)
    return result


def _watch_publishers(
    pubs: list[subprocess.Popen[str]],
    progress: list[Path],
    load: Load,
    counter: Progress,
    backlog_limit: int,
    hold: bool = False,
) -> tuple[bool, int]:
    """Wait for the publishers; (stopped early, pauses). Once the backlog passes `backlog_limit` they are
    stopped, or with `hold` paused (SIGSTOP) until the backlog is half of it, so the pressure lasts the
    whole `duration`: a maximum measured over seconds of drain alone varied by ±15-30 % between runs."""
    deadline = time.time() + (load.duration or 600) + 60
    paused, pauses = False, 0
    try:
        while any(p.poll() is None for p in pubs) and time.time() < deadline:
            backlog = _published_so_far(progress) - counter.fast() if backlog_limit else 0
            if paused and backlog < backlog_limit // 2:
                _signal(pubs, signal.SIGCONT)
                paused = False
            elif backlog > backlog_limit and not paused:
                if not hold:
                    _signal(pubs, signal.SIGTERM)
                    return True, pauses
                _signal(pubs, signal.SIGSTOP)
                paused, pauses = True, pauses + 1
            time.sleep(0.25)
    finally:
        if paused:
            _signal(pubs, signal.SIGCONT)
    return False, pauses


def _signal(pubs: list[subprocess.Popen[str]], sig: signal.Signals) -> None:
    for p in pubs:
        if p.poll() is None:
            p.send_signal(sig)


def _published_so_far(progress: list[Path]) -> int:
    total = 0
    for f in progress:
        with contextlib.suppress(OSError, ValueError):
            total += int(f.read_text() or 0)
    return total


class Progress:
    """How many of this run's messages are committed: the bridge's counter (cheap), confirmed by rows."""

    def __init__(self, db_url: str, consumer: str, prefix: str) -> None:
        self.conn = psycopg.connect(db_url, autocommit=True)
        self.consumer = consumer
        self.prefix = prefix
        self.baseline = self._counter()

    def _counter(self) -> int:
        row = self.conn.execute(COUNTER_TOTAL, ("messages_stored",)).fetchone()
        return int(row[0]) if row else 0

    def exact(self) -> int:
        row = self.conn.execute(
            "SELECT count(*) FROM meter_readings WHERE meter_id LIKE %s", (self.prefix + "-%",)
        ).fetchone()
        return int(row[0]) if row else 0

    def fast(self) -> int:
        """Committed so far; for our bridge the counter (it may include other publishers' messages)."""
        return self._counter() - self.baseline if self.consumer == "ours" else self.exact()

    def wait_for(self, n: int, timeout: float) -> float | None:
        """The time at which `n` rows of this run were committed, or None after `timeout`."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.fast() >= n and self.exact() >= n:
                return time.time()
            time.sleep(0.1)
        return None

    def close(self) -> None:
        self.conn.close()


class CpuMeter:
    """CPU seconds over a run: the whole machine (/proc/stat) and ours, so others' load shows."""

    def start(self, bridge_pids: list[int], svc: Services) -> None:
        self.t0 = time.monotonic()
        self.machine0 = _machine_busy()
        self.procs: dict[str, list[psutil.Process]] = {"bridge": [psutil.Process(p) for p in bridge_pids]}
        pg = [psutil.Process(svc.postgres_pid)] if svc.postgres_pid else []
        self.procs["postgres"] = pg + [c for p in pg for c in p.children(recursive=True)]
        self.procs["broker"] = [psutil.Process(svc.broker_pid)] if svc.broker_pid else []
        # the benchmark's own measuring: this process and the latency listener (publishers report their own)
        me = psutil.Process()
        # the services may be our children too (started by the benchmark): they are counted above
        services = {p.pid for k in ("postgres", "broker") for p in self.procs[k]}
        self.procs["bench"] = [me] + [c for c in me.children() if c.pid not in bridge_pids and c.pid not in services]
        self.before = {k: self._cpu(k) for k in self.procs}
        self.loadavg0 = os.getloadavg()[0]

    def _cpu(self, name: str) -> float:
        total = 0.0
        for p in self.procs[name]:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system
        return total

    def finish(self, reports: list[dict[str, Any]]) -> dict[str, float]:
        if svc_pg := self.procs.get("postgres"):
            # backends started during the run (the bridge's connection) count from zero
            with contextlib.suppress(psutil.Error):
                known = {p.pid for p in svc_pg}
                svc_pg.extend(c for c in svc_pg[0].children(recursive=True) if c.pid not in known)
        wall = time.monotonic() - self.t0
        out = {k: round(100 * (self._cpu(k) - self.before.get(k, 0.0)) / wall, 1) for k in self.procs}
        out["publishers"] = round(100 * sum(r.get("cpu_s", 0.0) for r in reports) / wall, 1)
        out["machine"] = round(100 * (_machine_busy() - self.machine0) / wall, 1)
        out["others"] = round(max(0.0, out["machine"] - sum(v for k, v in out.items() if k != "machine")), 1)
        out["loadavg_1m_start"] = round(self.loadavg0, 2)
        out["loadavg_1m_end"] = round(os.getloadavg()[0], 2)
        return out


def _machine_busy() -> float:
    """Busy CPU seconds of the whole machine since boot (all cores)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _verify(result: IngestResult, db_url: str, prefix: str, reports: list[dict[str, Any]]) -> None:
    """Each published (meter_id, ts) stored exactly once: compare per meter with what was published."""
    rows = _query(
        db_url,
        "SELECT meter_id, count(*), count(DISTINCT ts) FROM meter_readings WHERE meter_id LIKE %s GROUP BY meter_id",
        (prefix + "-%",),
    )
    got = {m: (n, d) for m, n, d in rows}
    expected: dict[str, int] = {}
    for r in reports:
        for j, n in enumerate(r["per_meter"]):
            if n:
                expected[f"{r['prefix']}-{j}"] = n
    result.rows = sum(n for n, _ in got.values())
    result.distinct = sum(d for _, d in got.values())
    result.doubled = result.rows - result.distinct
    result.lost = sum(max(0, n - got.get(m, (0, 0))[1]) for m, n in expected.items())
    result.extra = sum(max(0, d - expected.get(m, 0)) for m, (_, d) in got.items())
    # latency lower bound: received_at is now() of the writing transaction, i.e. its start
    n, p50, p99, top = _query(
        db_url,
        "SELECT count(*), percentile_disc(0.5) WITHIN GROUP (ORDER BY d), percentile_disc(0.99) WITHIN GROUP "
        "(ORDER BY d), max(d) FROM (SELECT extract(epoch FROM received_at - ts)::float8 * 1000 AS d "
        "FROM meter_readings WHERE meter_id LIKE %s) x",
        (prefix + "-%",),
    )[0]
    result.latency_db = {"n": n, "p50_ms": p50, "p99_ms": p99, "max_ms": top}
    # rows per second of commit (by transaction start), whole seconds strictly inside the run
    per_sec = _query(
        db_url,
        "SELECT date_trunc('second', received_at) s, count(*), "
        "round(max(extract(epoch FROM received_at - ts)) * 1000) FROM meter_readings WHERE meter_id LIKE %s "
        "GROUP BY 1 ORDER BY 1",
        (prefix + "-%",),
    )
    inner = sorted(n for _, n, _ in per_sec[1:-1])
    if inner:
        result.per_second = {
            "seconds": len(inner),
            "min": inner[0],
            "median": inner[len(inner) // 2],
            "max": inner[-1],
            # where the slow moments are: [second since the first, rows, max latency (txn start) ms]
            "series": [[int((s - per_sec[0][0]).total_seconds()), n, int(d)] for s, n, d in per_sec],
        }
