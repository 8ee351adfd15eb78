"""Fixtures for tests against the real services started by `scripts/test`.

Addresses come from the environment (`scripts/services env`). With CI_REQUIRE_SERVICES=1 a missing
service fails the test loudly; without it (a developer's partial checkout) the test is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import paho.mqtt.client as mqtt
import psycopg
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from bridge.config import MqttUrl, Settings
from bridge.energy import BLOCK, block_start
from bridge.service import Bridge

ROOT = Path(__file__).resolve().parent.parent
_counter = itertools.count()


def service_url(name: str) -> str:
    url = os.environ.get(name)
    if url:
        return url
    message = f"{name} is not set: run the suite with scripts/test, which starts the services"
    if os.environ.get("CI_REQUIRE_SERVICES") == "1":
        pytest.fail(message)
    pytest.skip(message)


def with_database(url: str, dbname: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{dbname}"))


def unique(prefix: str) -> str:
    """A device id no other test uses (tests share one database per level)."""
    return f"{prefix}-{os.getpid()}-{next(_counter)}-{uuid.uuid4().hex[:6]}"


def migrate(url: str, *args: str, env: dict[str, str] | None = None) -> None:
    """Run the real `alembic` command against `url`."""
    full_env = {**os.environ, **(env or {}), "DATABASE_URL": url}
    proc = subprocess.run(
        [sys.executable, "-m", "alembic", *args],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if proc.returncode != 0:
        raise AssertionError(f"alembic {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")


def create_database(admin_url: str, env: dict[str, str] | None = None) -> str:
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = with_database(admin_url, name)
    migrate(url, "upgrade", "head", env=env)
    return url


@pytest.fixture(scope="session")
def mqtt_url() -> str:
    return service_url("TEST_MQTT_URL")


@pytest.fixture(scope="session")
def pg_admin_url() -> str:
    return service_url("TEST_PG_URL")


@pytest.fixture(scope="session")
def site_env() -> dict[str, str]:
    """The site the shared test databases are migrated for: a zone that is not UTC."""
    return {"SITE_TIMEZONE": "Europe/Berlin", "PEAK_WINDOW": "14:00-22:00"}


@pytest.fixture(scope="session")
def apache_url(pg_admin_url: str, site_env: dict[str, str]) -> str:
    """A database on PostgreSQL 15 + Apache TimescaleDB, migrated once for the session."""
    return create_database(pg_admin_url, {**site_env, "SCHEMA_LEVEL": "auto"})


@pytest.fixture(scope="session")
def plain_url(pg_admin_url: str, site_env: dict[str, str]) -> str:
    return create_database(pg_admin_url, {**site_env, "SCHEMA_LEVEL": "plain"})


@pytest.fixture(scope="session")
def oracle_url() -> Iterator[str]:
    """PGlite with full TimescaleDB: one database, one connection at a time; migrated for the session."""
    url = service_url("TEST_ORACLE_URL")
    with psycopg.connect(url, autocommit=True) as conn:
        leftover = conn.execute("SELECT to_regclass('alembic_version') IS NOT NULL").fetchone()
    if leftover and leftover[0]:
        migrate(url, "downgrade", "base")
    migrate(url, "upgrade", "head", env={"SITE_TIMEZONE": "Europe/Berlin"})
    yield url
    migrate(url, "downgrade", "base")


def settings_for(db_url: str, mqtt_url: str, **overrides: Any) -> Settings:
    base = Settings.from_env(
        {
            "DATABASE_URL": db_url,
            "MQTT_URL": mqtt_url,
            "SITE_TIMEZONE": "Europe/Berlin",
            "BRIDGE_FLUSH_MS": "10",
            "BRIDGE_HEALTH": "127.0.0.1:0",
        }
    )
    return replace(base, **{"client_id": unique("bridge"), **overrides})


class RunningBridge:
    def __init__(self, bridge: Bridge, task: asyncio.Task[None], stop: asyncio.Event) -> None:
        self.bridge, self.task, self.stop = bridge, task, stop

    async def close(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 30)


@pytest.fixture
async def start_bridge() -> AsyncIterator[Callable[[Settings], Any]]:
    """Start in-process bridges; each is stopped (flushing) at the end of the test."""
    running: list[RunningBridge] = []

    async def start(settings: Settings) -> RunningBridge:
        bridge = Bridge(settings)
        stop = asyncio.Event()
        task = asyncio.create_task(bridge.run(stop))
        ready = asyncio.create_task(bridge.ready.wait())
        done, _ = await asyncio.wait({task, ready}, timeout=20, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            task.result()  # raises what stopped it
        assert ready in done, "bridge did not connect within 20 s"
        rb = RunningBridge(bridge, task, stop)
        running.append(rb)
        return rb

    yield start
    for rb in running:
        if not rb.task.done():
            await rb.close()


class Publisher:
    """A device-like MQTT client publishing at QoS 1 and waiting for each PUBACK."""

    def __init__(self, url: str) -> None:
        u = MqttUrl.parse(url)
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=unique("pub"))
        self.client.connect(u.host, u.port)
        self.client.loop_start()

    def publish(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(10)
        assert info.is_published(), f"broker did not accept {topic}"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def publisher(mqtt_url: str) -> Iterator[Publisher]:
    pub = Publisher(mqtt_url)
    yield pub
    pub.close()


def query(url: str, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()


async def room_in_block(after_start: float = 3.0, before_end: float = 20.0) -> datetime:
    """The current block's start, once `now` is far enough from both of its edges for a test to finish in it."""
    now = datetime.now(UTC)
    start = block_start(now)
    if (start + BLOCK - now).total_seconds() < before_end:
        await asyncio.sleep((start + BLOCK - now).total_seconds() + after_start)
    elif (now - start).total_seconds() < after_start:
        await asyncio.sleep(after_start - (now - start).total_seconds())
    return block_start(datetime.now(UTC))


async def wait_for_rows(url: str, sql: str, params: Any, expected: int, within: float = 15.0) -> list[tuple[Any, ...]]:
    """Poll until `sql` returns at least `expected` rows (then return them) or fail with what was seen."""
    deadline = time.monotonic() + within
    rows: list[tuple[Any, ...]] = []
    while time.monotonic() < deadline:
        rows = await asyncio.to_thread(query, url, sql, params)
        if len(rows) >= expected:
            return rows
        await asyncio.sleep(0.1)
    raise AssertionError(f"expected {expected} rows within {within} s, got {len(rows)}: {rows[:5]}")


API_TOKEN = "test-token"


class ApiServer:
    """A real uvicorn serving the app on an ephemeral 127.0.0.1 port, with its own MQTT client id."""

    def __init__(self, base_url: str, settings: Any) -> None:
        self.base_url = base_url
        self.ws_url = base_url.replace("http://", "ws://") + "/ws"
        self.settings = settings
        self.headers = {"Authorization": f"Bearer {API_TOKEN}"}

    def client(self, **kwargs: Any) -> Any:
        import httpx

        return httpx.AsyncClient(base_url=self.base_url, headers=self.headers, timeout=30, **kwargs)


@pytest.fixture
async def api_server(
    apache_url: str, mqtt_url: str, start_bridge: Callable[[Settings], Any]
) -> AsyncIterator[ApiServer]:
    """The API on uvicorn beside a running bridge, both on the Apache-level test database."""
    from api.config import ApiSettings

    core = settings_for(apache_url, mqtt_url)
    await start_bridge(core)
    settings = ApiSettings(
        core=core,
        tokens=(API_TOKEN,),
        mqtt_client_id=unique("api"),
        command_timeout=5.0,
        read_obis_wait=5.0,
        db_pool_max=4,
    )
    async with serve_api(settings) as api:
        yield api


@contextlib.asynccontextmanager
async def serve_api(settings: Any) -> AsyncIterator[ApiServer]:
    """The app on a real uvicorn, on an ephemeral 127.0.0.1 port, for as long as the block runs."""
    import uvicorn

    from api.app import create_app

    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    )
    task = asyncio.create_task(server.serve())
    deadline = time.monotonic() + 20
    while not server.started:
        if task.done():
            task.result()
        assert time.monotonic() < deadline, "uvicorn did not start"
        await asyncio.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield ApiServer(f"http://127.0.0.1:{port}", settings)
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 15)
