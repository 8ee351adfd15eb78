"""The ceilings: what the broker alone and the database alone can do with the same messages and rows."""

from __future__ import annotations

import io
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg

from bridge.config import MqttUrl

from . import ingest
from .publisher import payload
from .services import Services, create_database, drop_database

MOSQUITTO_PUB = shutil.which("mosquitto_pub") or "mosquitto_pub"
MOSQUITTO_SUB = shutil.which("mosquitto_sub") or "mosquitto_sub"


@dataclass
class Ceiling:
    name: str
    count: int
    seconds: float
    rate: float
    note: str = ""
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Subscriber:
    """mosquitto_sub (QoS 1) printing payloads into a pipe that a thread counts, one line per message."""

    def __init__(self, svc: Services, count: int) -> None:
        url = MqttUrl.parse(svc.mqtt_url)
        args = [MOSQUITTO_SUB, "-h", url.host, "-p", str(url.port), "-i", f"ceil-sub-{uuid.uuid4().hex[:6]}"]
        args += ["-t", "meters/#", "-q", "1", "-C", str(count)]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.count = 0
        self.last = time.monotonic()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        time.sleep(1.0)  # mosquitto_sub has no "subscribed" signal; on loopback this is plenty

    def _read(self) -> None:
        stdout = self.proc.stdout
        assert isinstance(stdout, io.BufferedReader)
        while chunk := stdout.read1(1 << 16):
            self.count += chunk.count(b"\n")
            self.last = time.monotonic()

    def wait(self, total: int, timeout: float, idle: float = 5.0) -> int:
        """Until `total` arrived, nothing arrived for `idle` s, or `timeout`; returns how many arrived."""
        deadline = time.monotonic() + timeout
        while self.count < total and time.monotonic() < deadline and time.monotonic() - self.last < idle:
            time.sleep(0.05)
        self.proc.kill()
        self.proc.wait(5)
        return self.count


CHUNK_LINES = 20_000  # mosquitto_pub 2.0.11 -l exits with QoS 1 messages unsent on much larger inputs


def broker_c(svc: Services, count: int, publishers: int = 2, timeout: float = 300) -> Ceiling:
    """mosquitto_pub -l (C, QoS 1, 1000 in flight) from files → broker → mosquitto_sub (QoS 1) discarding.

    Each of `publishers` slots runs mosquitto_pub over its files one after the other (20,000 lines each)."""
    url = MqttUrl.parse(svc.mqtt_url)
    work = Path(tempfile.mkdtemp(prefix="bench-ceil-"))
    per = count // publishers
    t = int(time.time() * 1e6)
    for i in range(publishers):
        for c, first in enumerate(range(0, per, CHUNK_LINES)):
            with open(work / f"pub-{i}-{c:04d}.txt", "wb") as out:
                last = min(per, first + CHUNK_LINES)
                out.writelines(payload(10.0 + (j % 400) / 10, t + j) + b"\n" for j in range(first, last))
    total = per * publishers
    sub = Subscriber(svc, total)
    start = time.monotonic()
    for i in range(publishers):
        pub = shlex.join([MOSQUITTO_PUB, "-h", url.host, "-p", str(url.port), "-t", f"meters/ceil-{i}/reading"])
        script = f'for f in {shlex.quote(str(work))}/pub-{i}-*.txt; do {pub} -q 1 -M 1000 -l < "$f"; done'
        subprocess.Popen(["sh", "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return _finish("broker: mosquitto_pub → mosquitto_sub", total, start, sub, timeout, work)


def broker_ours(svc: Services, count: int, publishers: int = 2, timeout: float = 300) -> Ceiling:
    """The benchmark's own publisher processes → broker → mosquitto_sub: what the load generator can offer."""
    sub = Subscriber(svc, count // publishers * publishers)
    start = time.monotonic()
    load = ingest.Load(publishers=publishers, meters=2000, count=count)
    pubs = ingest.start_publishers(svc, f"ceilp{uuid.uuid4().hex[:4]}", load)
    ceiling = _finish("broker: bench publishers → mosquitto_sub", count // publishers * publishers, start, sub, timeout)
    for p in pubs:
        p.communicate(timeout=30)
    return ceiling


def _finish(name: str, total: int, start: float, sub: Subscriber, timeout: float, work: Path | None = None) -> Ceiling:
    got = sub.wait(total, timeout)
    seconds = sub.last - start
    if work is not None:
        shutil.rmtree(work, ignore_errors=True)
    error = None if got >= total else f"received {got:,} of {total:,} (a publisher exited with messages in flight)"
    return Ceiling(name, got, seconds, got / seconds if seconds > 0 else 0.0, "QoS 1 both ways", error)


def database(svc: Services, count: int, batch: int = 2000, meters: int = 2000) -> Ceiling:
    """COPY the same meter rows into the same hypertable, one COPY + COMMIT per batch, on one connection."""
    db_url = create_database(svc.admin_url)
    try:
        base = datetime.now(UTC) - timedelta(minutes=30)
        rows = [
            (f"ceil-{i % meters}", base + timedelta(microseconds=i), 10.0 + (i % 400) / 10, None, None, 230.4,
             (10.0 + (i % 400) / 10) * 4.35, 50.01, 0.97)
            for i in range(count)
        ]  # fmt: skip
        sql = (
            "COPY meter_readings (meter_id, ts, power_kw, kwh_consumed_ac, energy_total_kwh, voltage, current, "
            "frequency, power_factor) FROM STDIN"
        )
        with psycopg.connect(db_url) as conn:
            start = time.monotonic()
            for i in range(0, count, batch):
                with conn.cursor() as cur, cur.copy(sql) as copy:
                    for row in rows[i : i + batch]:
                        copy.write_row(row)
                conn.commit()
            seconds = time.monotonic() - start
            stored = conn.execute("SELECT count(*) FROM meter_readings").fetchone()
        n = int(stored[0]) if stored else 0
        error = None if n == count else f"stored {n} of {count}"
        return Ceiling(
            "database: COPY into meter_readings",
            count,
            seconds,
            count / seconds,
            f"{batch} rows per COPY+COMMIT",
            error,
        )
    finally:
        drop_database(svc.admin_url, db_url)


def copy_rate(svc: Services, count: int = 200_000) -> float:
    """Rows/s of large COPYs (for estimating how long loading N readings takes)."""
    return database(svc, count, batch=50_000).rate
