"""Services of the fault tests' own: a broker and a database each test may stop and start at will,
so the shared services of the rest of the suite are never disturbed."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from ..conftest import migrate, service_url

PG_BIN = Path(os.environ.get("TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_postgres(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


class OwnPostgres:
    """A PostgreSQL 15 (+ TimescaleDB when installed) cluster in a temporary directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "data"
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def init(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres")
        subprocess.run(
            _as_postgres([str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres"]),
            check=True,
            capture_output=True,
            timeout=120,
        )
        conf = self.data / "postgresql.conf"
        preload = "timescaledb" if Path("/usr/share/postgresql/15/extension/timescaledb.control").exists() else ""
        with conf.open("a") as f:
            f.write(
                f"\nport = {self.port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{self.root}'\n"
                f"fsync = off\nsynchronous_commit = off\nshared_preload_libraries = '{preload}'\n"
                "timescaledb.telemetry_level = off\n"
            )

    def start(self) -> None:
        subprocess.run(
            _as_postgres(
                [str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "log"), "-w", "-t", "60", "start"]
            ),
            check=True,
            capture_output=True,
            timeout=90,
        )

    def stop(self, mode: str = "fast") -> None:
        subprocess.run(
            _as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"]),
            check=False,
            capture_output=True,
            timeout=90,
        )

    def up(self) -> bool:
        try:
            with psycopg.connect(self.url, connect_timeout=2):
                return True
        except psycopg.OperationalError:
            return False


class OwnBroker:
    """A Mosquitto with persistence (sessions and queued QoS 1 messages survive a restart)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"mqtt://127.0.0.1:{self.port}"
        self.conf = root / "mosquitto.conf"
        self.proc: subprocess.Popen[bytes] | None = None

    def init(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o777)
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
            f"persistence_location {self.root}/\nautosave_interval 1\nmax_inflight_messages 1000\n"
            f"max_queued_messages 1000000\nlog_dest file {self.root}/mosquitto.log\n"
        )

    def start(self) -> None:
        mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.proc = subprocess.Popen(
            [mosquitto, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError("mosquitto did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()  # SIGTERM: Mosquitto saves its persistence file on the way out
            self.proc.wait(15)
            self.proc = None


@pytest.fixture
def own_pg(site_env: dict[str, str]) -> Iterator[OwnPostgres]:
    service_url("TEST_PG_URL")  # the machine's PostgreSQL must be there, as for the rest of the suite
    root = Path(tempfile.mkdtemp(prefix="fault-pg-"))
    pg = OwnPostgres(root)
    pg.init()
    pg.start()
    with psycopg.connect(pg.url, autocommit=True) as conn:
        conn.execute("CREATE DATABASE telemetry")
    pg.url = pg.url.rsplit("/", 1)[0] + "/telemetry"
    migrate(pg.url, "upgrade", "head", env=site_env)
    try:
        yield pg
    finally:
        pg.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def own_broker() -> Iterator[OwnBroker]:
    service_url("TEST_MQTT_URL")
    root = Path(tempfile.mkdtemp(prefix="fault-mqtt-"))
    broker = OwnBroker(root)
    broker.init()
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()
        shutil.rmtree(root, ignore_errors=True)
