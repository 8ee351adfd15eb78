"""Faults survived with nothing lost: a counted QoS 1 stream while the database or broker goes away."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import orjson
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from api.mqtt import MqttLink
from bridge.config import MqttUrl

from ..conftest import ROOT, Publisher, query, settings_for, unique, wait_for_rows
from .conftest import OwnBroker, OwnPostgres, free_port

DB_DOWN_S = float(os.environ.get("FAULT_DB_DOWN_S", "30"))


class Stream:
    """A device publishing `count` numbered readings at QoS 1 from its own thread, at `rate` per second.

    Its session is persistent and paho reconnects by itself, so messages published while the broker is
    away are sent once it is back.
    """

    def __init__(self, url: str, meter: str, count: int, rate: float) -> None:
        self.meter, self.count, self.rate = meter, count, rate
        u = MqttUrl.parse(url)
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id=unique("dev"), clean_session=False
        )
        self.client.reconnect_delay_set(0.2, 1)
        self.client.max_queued_messages_set(0)  # unlimited: keep everything published while disconnected
        self.client.connect(u.host, u.port)
        self.client.loop_start()
        self.start = datetime(2026, 11, 24, 0, 0, tzinfo=UTC)
        self.infos: list[mqtt.MQTTMessageInfo] = []
        self.acked: set[int] = set()
        # PUBACKs as they come: a message published while disconnected is kept by paho and sent later
        self.client.on_publish = lambda client, userdata, mid, reason, props: self.acked.add(mid)
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        t0 = time.monotonic()
        for i in range(self.count):
            ts = (self.start + timedelta(seconds=i)).isoformat()
            payload = orjson.dumps({"totalPowerKw": 1.0, "timestamp": ts})
            self.infos.append(self.client.publish(f"meters/{self.meter}/reading", payload, qos=1))
            delay = t0 + (i + 1) / self.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)

    def finish(self, within: float) -> None:
        self.thread.join(within)
        deadline = time.monotonic() + within
        mids = {info.mid for info in self.infos}
        while not mids <= self.acked and time.monotonic() < deadline:
            time.sleep(0.05)
        assert mids <= self.acked, f"{len(mids - self.acked)} messages never acknowledged by the broker"
        self.client.disconnect()
        self.client.loop_stop()


def health(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


@contextmanager
def bridge_process(db_url: str, mqtt_url: str) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": db_url,
        "MQTT_URL": mqtt_url,
        "BRIDGE_CLIENT_ID": unique("bridge"),
        "SITE_TIMEZONE": "Europe/Berlin",
        "BRIDGE_HEALTH": f"127.0.0.1:{port}",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "bridge"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 20
        while health(port) != 200:
            assert proc.poll() is None, "the bridge exited"
            assert time.monotonic() < deadline, "the bridge did not become healthy"
            time.sleep(0.1)
        yield proc, port
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def exactly_once(url: str, meter: str, count: int) -> None:
    rows = query(url, "SELECT count(*), count(DISTINCT ts) FROM meter_readings WHERE meter_id = %s", (meter,))
    assert rows == [(count, count)]


@pytest.mark.timeout(240)
async def test_database_outage_loses_nothing(own_pg: OwnPostgres, mqtt_url: str) -> None:
    """The database stops for 30 s mid-stream: the bridge stops acking, retries, resumes; every reading once."""
    meter = unique("m")
    rate = 50.0
    count = int(rate * (DB_DOWN_S + 15))
    with bridge_process(own_pg.url, mqtt_url) as (proc, port):
        stream = Stream(mqtt_url, meter, count, rate)
        stream.thread.start()
        await wait_for_rows(own_pg.url, "SELECT 1 FROM meter_readings WHERE meter_id = %s LIMIT 50", (meter,), 50)
        await asyncio.to_thread(own_pg.stop)
        down_since = time.monotonic()
        while health(port) != 503:
            assert time.monotonic() - down_since < 15, "the bridge never noticed the database was gone"
            await asyncio.sleep(0.2)
        await asyncio.sleep(max(0.0, DB_DOWN_S - (time.monotonic() - down_since)))
        assert proc.poll() is None, "the bridge died while the database was away"
        await asyncio.to_thread(own_pg.start)
        await asyncio.to_thread(stream.finish, 120)
        await wait_for_rows(own_pg.url, "SELECT 1 FROM meter_readings WHERE meter_id = %s", (meter,), count, within=60)
        exactly_once(own_pg.url, meter, count)
        assert health(port) == 200


@pytest.mark.timeout(180)
async def test_broker_restart_loses_nothing(own_broker: OwnBroker, apache_url: str) -> None:
    """Mosquitto restarts mid-stream: sessions and queued QoS 1 messages survive; bridge and API reconnect."""
    meter = unique("m")
    count, rate = 1500, 150.0
    link = MqttLink(MqttUrl.parse(own_broker.url), unique("api"))
    async with link:
        assert link.connected
        with bridge_process(apache_url, own_broker.url) as (proc, port):
            stream = Stream(own_broker.url, meter, count, rate)
            stream.thread.start()
            await wait_for_rows(apache_url, "SELECT 1 FROM meter_readings WHERE meter_id = %s LIMIT 100", (meter,), 100)
            await asyncio.to_thread(own_broker.stop)
            await asyncio.sleep(2)
            assert not link.connected
            await asyncio.to_thread(own_broker.start)
            await asyncio.to_thread(stream.finish, 60)
            await wait_for_rows(
                apache_url, "SELECT 1 FROM meter_readings WHERE meter_id = %s", (meter,), count, within=60
            )
            exactly_once(apache_url, meter, count)
            assert proc.poll() is None and health(port) == 200
        deadline = time.monotonic() + 20
        while not link.connected:
            assert time.monotonic() < deadline, "the API's MQTT link did not reconnect"
            await asyncio.sleep(0.1)


async def test_refused_row_is_dead_lettered_and_the_batch_lands(
    apache_url: str, mqtt_url: str, start_bridge, publisher: Publisher
) -> None:
    """A row the database refuses (NUL in text) goes to dead_letters with the reason; its batch-mates land."""
    settings = replace(settings_for(apache_url, mqtt_url), flush_interval=0.3)
    await start_bridge(settings)
    pump = unique("p")
    base = datetime(2026, 11, 24, 8, 0, tzinfo=UTC)
    for i in range(5):
        event = "pump\u0000started" if i == 2 else f"event_{i}"
        publisher.publish(
            f"pumps/{pump}/event",
            orjson.dumps({"event": event, "timestamp": (base + timedelta(seconds=i)).isoformat()}),
        )
    rows = await wait_for_rows(apache_url, "SELECT event FROM pump_events WHERE device_id = %s ORDER BY ts", (pump,), 4)
    assert [r[0] for r in rows] == ["event_0", "event_1", "event_3", "event_4"]
    (letter,) = await wait_for_rows(
        apache_url, "SELECT reason, payload FROM dead_letters WHERE topic = %s", (f"pumps/{pump}/event",), 1
    )
    assert "refused by the database" in letter[0]
    assert b"\\u0000" in bytes(letter[1])


async def test_clock_skew_future_refused_late_accepted(
    apache_url: str, mqtt_url: str, start_bridge, publisher: Publisher
) -> None:
    """A device clock hours ahead is dead-lettered; a reading days late lands in its own block."""
    await start_bridge(settings_for(apache_url, mqtt_url))
    meter = unique("m")
    now = datetime.now(UTC)
    late = (now - timedelta(days=3)).replace(minute=10, second=0, microsecond=0)
    publisher.publish(f"meters/{meter}/reading", orjson.dumps({"totalPowerKw": 6.0, "timestamp": now.isoformat()}))
    publisher.publish(
        f"meters/{meter}/reading",
        orjson.dumps({"totalPowerKw": 6.0, "timestamp": (now + timedelta(hours=3)).isoformat()}),
    )
    publisher.publish(f"meters/{meter}/reading", orjson.dumps({"totalPowerKw": 6.0, "timestamp": late.isoformat()}))
    await wait_for_rows(apache_url, "SELECT 1 FROM meter_readings WHERE meter_id = %s", (meter,), 2)
    (letter,) = await wait_for_rows(
        apache_url, "SELECT reason FROM dead_letters WHERE topic = %s", (f"meters/{meter}/reading",), 1
    )
    assert "future" in letter[0]
    block = late.replace(minute=0)
    assert query(
        apache_url, "SELECT total_kwh FROM meter_blocks_30m WHERE meter_id = %s AND block_start = %s", (meter, block)
    ) == [(0.5,)]
