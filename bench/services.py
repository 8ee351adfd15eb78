"""The benchmark's own broker and database, started and stopped by the benchmark itself.

Other work on this machine uses the test services (scripts/services), so the benchmark never touches
them: it runs a Mosquitto and a PostgreSQL 15 + TimescaleDB cluster of its own on free loopback ports,
with all state under one directory that is removed at the end. Both are configured like production
(deploy/mosquitto/mosquitto.conf; PostgreSQL's durable defaults: fsync and synchronous_commit on).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg

ROOT = Path(__file__).resolve().parent.parent
PG_BIN = Path(os.environ.get("TELEMETRY_PG_BIN", "/usr/lib/postgresql/15/bin"))
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _as_postgres(cmd: list[str]) -> list[str]:
    # postgres refuses to run as root
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _wait(check: object, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():  # type: ignore[operator]
                return
        except Exception:  # not up yet
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{what} not ready within {timeout:.0f} s")


@dataclass
class Broker:
    port: int
    conf: Path
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"mqtt://{HOST}:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid


def start_broker(base: Path) -> Broker:
    base.mkdir(parents=True, exist_ok=True)
    data = base / "data"
    data.mkdir(exist_ok=True)
    port = free_port()
    conf = base / "mosquitto.conf"
    # the production values (deploy/mosquitto/mosquitto.conf), without authentication
    conf.write_text(
        f"""listener {port} {HOST}
allow_anonymous true
persistence true
persistence_location {data}/
autosave_interval 10
max_inflight_messages 1000
max_queued_messages 1000000
log_dest file {base}/mosquitto.log
log_type error
log_type warning
log_type notice
"""
    )
    if os.geteuid() == 0:
        shutil.chown(data, "mosquitto")
        (base / "mosquitto.log").touch()
        shutil.chown(base / "mosquitto.log", "mosquitto")
    out = open(base / "mosquitto.out", "ab")
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=out, stderr=out, stdin=subprocess.DEVNULL)

    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"mosquitto exited: see {base}/mosquitto.out")
        with socket.create_connection((HOST, port), timeout=1):
            return True

    _wait(up, "mosquitto", 20)
    return Broker(port, conf, proc)


def stop_process(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@dataclass
class Postgres:
    port: int
    data: Path

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@{HOST}:{self.port}/postgres"


def start_postgres(base: Path) -> Postgres:
    base.mkdir(parents=True, exist_ok=True)
    data = base / "data"
    sock = base / "socket"
    if data.exists():
        shutil.rmtree(data)
    data.mkdir()
    sock.mkdir(exist_ok=True)
    if os.geteuid() == 0:
        for p in (base, data, sock):
            shutil.chown(p, "postgres", "postgres")
    data.chmod(0o700)
    subprocess.run(
        _as_postgres(
            [str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "-E", "UTF8", "--locale=C", "--auth=trust"]
        ),
        check=True,
        capture_output=True,
        timeout=120,
    )
    port = free_port()
    # durable defaults (fsync, synchronous_commit on) as in production; memory sized for this machine
    with open(data / "postgresql.conf", "a") as conf:
        conf.write(
            f"""
listen_addresses = '{HOST}'
port = {port}
unix_socket_directories = '{sock}'
max_connections = 200
shared_preload_libraries = 'timescaledb,pg_stat_statements'
timescaledb.telemetry_level = off
shared_buffers = 1GB
max_wal_size = 4GB
timezone = 'UTC'
"""
        )
    log = base / "postgres.log"
    subprocess.run(
        _as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "start"]),
        check=True,
        capture_output=True,
        timeout=90,
    )
    pg = Postgres(port, data)

    def up() -> bool:
        with psycopg.connect(pg.admin_url, connect_timeout=2):
            return True

    _wait(up, "postgres", 30)
    return pg


def stop_postgres(pg: Postgres) -> None:
    subprocess.run(
        _as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(pg.data), "-m", "fast", "-w", "-t", "30", "stop"]),
        capture_output=True,
        timeout=60,
    )


def postmaster_pid(pg_data: Path) -> int | None:
    try:
        return int((pg_data / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


def create_database(admin_url: str, prefix: str = "bench") -> str:
    """A fresh database migrated by the project's own `alembic upgrade head` (UTC site)."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = with_database(admin_url, name)
    env = {**os.environ, "DATABASE_URL": url, "SITE_TIMEZONE": "UTC", "SCHEMA_LEVEL": "auto"}
    proc = subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"alembic upgrade head failed:\n{proc.stdout}\n{proc.stderr}")
    # each mode starts with no dirty pages left by the one before (the API's 15 M-row load once stalled the
    # WebSocket run's commits behind its checkpoint: p99 1.5 s instead of ~150 ms)
    with contextlib.suppress(psycopg.Error), psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute("CHECKPOINT")  # needs superuser or pg_checkpoint: a settled start, not a must
    return url


def drop_database(admin_url: str, url: str) -> None:
    name = urlsplit(url).path.lstrip("/")
    with contextlib.suppress(psycopg.Error), psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass
class Services:
    mqtt_url: str
    admin_url: str
    broker_pid: int | None = None
    postgres_pid: int | None = None
    own: bool = False


@contextlib.contextmanager
def own_services(base: Path) -> Iterator[Services]:
    """Our own broker and database for the duration of the benchmark; everything under `base` is removed."""
    base.mkdir(parents=True, exist_ok=True)
    os.chmod(base, 0o755)
    broker = start_broker(base / "mosquitto")
    pg: Postgres | None = None
    try:
        pg = start_postgres(base / "postgres")
        yield Services(broker.url, pg.admin_url, broker.pid, postmaster_pid(pg.data), own=True)
    finally:
        if pg is not None:
            stop_postgres(pg)
        stop_process(broker.proc)
        shutil.rmtree(base, ignore_errors=True)
