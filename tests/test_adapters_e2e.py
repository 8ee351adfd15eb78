"""Tasmota, Shelly and ESPHome devices replayed from their documented payloads: broker → bridge → database → API.

Each test works under its own topic prefixes (ADAPTERS) so that other tests' devices never cross them.
Fake devices answer commands in their firmware's dialect, as the docs describe.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from bridge.adapters import parse_specs
from bridge.config import MqttUrl, Settings

from . import adapter_payloads as doc
from .conftest import API_TOKEN, ApiServer, Publisher, query, serve_api, settings_for, unique, wait_for_rows

pytestmark = pytest.mark.asyncio(loop_scope="session")
BERLIN = ZoneInfo("Europe/Berlin")

Reply = Callable[[str, bytes], list[tuple[str, bytes]]]


@dataclass
class Site:
    """The API and a bridge configured with adapters under this test's own prefixes."""

    api: ApiServer
    settings: Settings
    tag: str

    @property
    def db(self) -> str:
        return self.settings.database_url


@pytest.fixture
async def site(apache_url: str, mqtt_url: str, start_bridge: Callable[[Settings], Any]) -> AsyncIterator[Site]:
    from api.config import ApiSettings

    tag = unique("fw")
    specs = parse_specs(
        f"tasmota:meter=%prefix%/{tag}/%topic%/; tasmota:pump=%prefix%/{tag}-pumps/%topic%/;"
        f"shelly:pump={tag}-shelly/+; esphome:meter={tag}-esp/+"
    )
    core = settings_for(apache_url, mqtt_url, adapters=specs, shelly_rpc_src=f"{tag}-api")
    await start_bridge(core)
    settings = ApiSettings(
        core=core, tokens=(API_TOKEN,), mqtt_client_id=unique("api"), command_timeout=10.0, db_pool_max=4
    )
    async with serve_api(settings) as api:
        yield Site(api, core, tag)


class FakeFirmware:
    """A device subscribed to its command topic, answering each command through `reply` as its firmware does."""

    def __init__(self, url: str, topic: str, reply: Reply) -> None:
        self.reply = reply
        self.received: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        u = MqttUrl.parse(url)
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=unique("fwdev"))
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *args: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(u.host, u.port)
        self.client.loop_start()
        self.client.subscribe(topic, qos=1)
        assert subscribed.wait(10), "fake device was not subscribed within 10 s"

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.received.append((message.topic, bytes(message.payload)))
        for topic, payload in self.reply(message.topic, bytes(message.payload)):
            client.publish(topic, payload, qos=1)

    async def commands(self, count: int, within: float = 10.0) -> list[tuple[str, bytes]]:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.received) >= count:
                    return list(self.received)
            await asyncio.sleep(0.05)
        raise AssertionError(f"expected {count} commands within {within} s, got {self.received}")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def fake_firmware(mqtt_url: str) -> Iterator[Callable[[str, Reply], FakeFirmware]]:
    devices: list[FakeFirmware] = []

    def start(topic: str, reply: Reply) -> FakeFirmware:
        dev = FakeFirmware(mqtt_url, topic, reply)
        devices.append(dev)
        return dev

    yield start
    for dev in devices:
        dev.close()


async def wait_command(site: Site, device_id: str, command_id: str, status: str, within: float = 15.0) -> dict:
    deadline = time.monotonic() + within
    body: dict[str, Any] = {}
    async with site.api.client() as http:
        while time.monotonic() < deadline:
            r = await http.get(f"/api/v1/devices/{device_id}/commands/{command_id}")
            assert r.status_code == 200, r.text
            body = r.json()
            if body["status"] == status:
                return body
            await asyncio.sleep(0.1)
    raise AssertionError(f"command never reached {status!r} within {within} s: {body}")


async def wait_device(site: Site, device_id: str, status: str, within: float = 15.0) -> tuple[Any, ...]:
    rows = await wait_for_rows(
        site.db,
        "SELECT kind, status, meta->'adapter' FROM devices WHERE device_id = %s AND status = %s",
        (device_id, status),
        1,
        within,
    )
    return rows[0]


def yesterday_at(hour: int, minute: int) -> datetime:
    """A naive local time (the device's clock) yesterday in the site's zone."""
    day = datetime.now(BERLIN).date() - timedelta(days=1)
    return datetime(day.year, day.month, day.day, hour, minute)


# ---- Tasmota ----------------------------------------------------------------------------------------------


async def test_tasmota_plug_energy_online_and_reset(site: Site, publisher: Publisher) -> None:
    """A Tasmota plug's LWT and SENSOR readings make an online meter whose block energy survives EnergyReset."""
    plug = unique("plug")
    publisher.publish(f"tele/{site.tag}/{plug}/LWT", doc.TASMOTA_LWT_ONLINE)
    kind, _, address = await wait_device(site, plug, "online")
    assert kind == "meter" and address == {"firmware": "tasmota", "topic": f"cmnd/{site.tag}/{plug}/"}
    start = yesterday_at(10, 0)
    totals = [3.705, 3.755, 3.805, 0.010]  # the last after `EnergyReset3 0` zeroed Total
    for minute, total in enumerate(totals, start=2):
        sensor = doc.tasmota_at(doc.TASMOTA_SENSOR, start + timedelta(minutes=minute), Total=total)
        publisher.publish(f"tele/{site.tag}/{plug}/SENSOR", sensor)
    rows = await wait_for_rows(
        site.db, "SELECT ts, energy_total_kwh FROM meter_readings WHERE meter_id = %s ORDER BY ts", (plug,), 4
    )
    assert rows[0] == (start.replace(minute=2, tzinfo=BERLIN), 3.705)  # the device's local clock, read in Berlin
    blocks = query(
        site.db,
        "SELECT block_start, total_kwh, reading_count FROM meter_blocks_30m WHERE meter_id = %s AND reading_count > 0",
        (plug,),
    )
    assert len(blocks) == 1
    block_start, total, count = blocks[0]
    assert block_start == start.replace(tzinfo=BERLIN) and count == 4
    assert total == pytest.approx(0.05 + 0.05 + 0.010)  # the reset counts from zero, never negative
    async with site.api.client() as http:
        r = await http.get("/api/meters", params={"status": "online", "limit": 1000})
        assert plug in {m["deviceId"] for m in r.json()}
    publisher.publish(f"tele/{site.tag}/{plug}/LWT", doc.TASMOTA_LWT_OFFLINE)
    await wait_device(site, plug, "offline")


async def test_tasmota_power_command_is_acked_by_result(
    site: Site, publisher: Publisher, fake_firmware: Callable[[str, Reply], FakeFirmware]
) -> None:
    """relay on/off goes out as cmnd/<topic>/POWER ON|OFF; the plug's stat/RESULT acks each command."""
    plug = unique("plug")
    publisher.publish(f"tele/{site.tag}/{plug}/STATE", doc.dumps(doc.TASMOTA_STATE))
    await wait_device(site, plug, "online")

    def tasmota(topic: str, payload: bytes) -> list[tuple[str, bytes]]:
        state = payload.decode().upper()
        return [
            (f"stat/{site.tag}/{plug}/RESULT", orjson.dumps({"POWER": state})),
            (f"stat/{site.tag}/{plug}/POWER", payload),
        ]

    device = fake_firmware(f"cmnd/{site.tag}/{plug}/POWER", tasmota)
    async with site.api.client() as http:
        ids = []
        for state in ("on", "off"):
            r = await http.post(f"/api/v1/devices/{plug}/commands", json={"command": "power", "state": state})
            assert r.status_code == 202, r.text
            ids.append(r.json()["commandId"])
            acked = await wait_command(site, plug, ids[-1], "acked")
            assert acked["result"] == {"status": "ok", "data": {"POWER": state.upper()}, "commandId": ids[-1]}
            assert acked["payload"]["sentAs"] == [{"topic": f"cmnd/{site.tag}/{plug}/POWER", "payload": state.upper()}]
        r = await http.post(f"/api/v1/devices/{plug}/commands", json={"command": "read_obis"})
        assert r.status_code == 422 and "understands" in r.json()["error"]["message"]
    assert [p for _, p in await device.commands(2)] == [b"ON", b"OFF"]


async def test_tasmota_relay_as_a_pump(site: Site, publisher: Publisher) -> None:
    """Under a pump FullTopic, STATE's POWER and SENSOR's power make the pump status the API reads."""
    well = unique("well")
    now = datetime.now(BERLIN).replace(tzinfo=None, microsecond=0)
    publisher.publish(
        f"tele/{site.tag}-pumps/{well}/SENSOR", doc.tasmota_at(doc.TASMOTA_SENSOR, now - timedelta(seconds=2))
    )
    state = dict(doc.TASMOTA_STATE, POWER="ON")
    publisher.publish(f"tele/{site.tag}-pumps/{well}/STATE", doc.tasmota_at(state, now))
    await wait_for_rows(site.db, "SELECT 1 FROM pump_status WHERE device_id = %s AND pump_running", (well,), 1)
    async with site.api.client() as http:
        body = (await http.get(f"/api/v1/devices/{well}/status")).json()
    assert body["pump"]["running"] is True and body["pump"]["power_watts"] == 5.0 and body["online"] is True
    assert body["ground_tank"]["level_percent"] is None


# ---- Shelly -----------------------------------------------------------------------------------------------


async def test_shelly_relay_is_a_pump_with_overlaid_notifications(site: Site, publisher: Publisher) -> None:
    """status/switch:0 then a NotifyStatus delta: the pump stops, its last metered power stays known."""
    relay = unique("shelly")
    prefix = f"{site.tag}-shelly/{relay}"
    publisher.publish(f"{prefix}/online", doc.SHELLY_ONLINE)
    publisher.publish(f"{prefix}/status/switch:0", doc.dumps(doc.SHELLY_SWITCH_STATUS))
    await wait_for_rows(site.db, "SELECT 1 FROM pump_latest WHERE device_id = %s AND pump_running", (relay,), 1)
    kind, _, address = await wait_device(site, relay, "online")
    assert kind == "pump" and address == {"firmware": "shelly", "rpc": f"{prefix}/rpc", "switch": 0}
    ts = time.time()
    publisher.publish(f"{prefix}/events/rpc", doc.shelly_at(doc.SHELLY_NOTIFY_STATUS, ts, output=False))
    await wait_for_rows(site.db, "SELECT 1 FROM pump_latest WHERE device_id = %s AND NOT pump_running", (relay,), 1)
    async with site.api.client() as http:
        body = (await http.get(f"/api/v1/devices/{relay}/status")).json()
    assert body["pump"] == {**body["pump"], "running": False, "power_watts": 8.9, "current_amps": 0.04}
    assert abs(datetime.fromisoformat(body["timestamp"]).timestamp() - ts) < 0.01  # the notification's own time
    publisher.publish(f"{prefix}/online", doc.SHELLY_OFFLINE)
    await wait_device(site, relay, "offline")


async def test_shelly_switch_set_is_matched_by_rpc_id(
    site: Site, publisher: Publisher, fake_firmware: Callable[[str, Reply], FakeFirmware]
) -> None:
    """pump on → Switch.Set on <prefix>/rpc; the reply on <src>/rpc with the same id acks it, an error fails it."""
    relay = unique("shelly")
    prefix = f"{site.tag}-shelly/{relay}"
    publisher.publish(f"{prefix}/status/switch:0", doc.dumps(dict(doc.SHELLY_SWITCH_STATUS, output=False)))
    await wait_device(site, relay, "online")
    answers = iter([{"result": doc.SHELLY_SET_RESULT}, {"error": doc.SHELLY_ERROR}])

    def shelly(topic: str, payload: bytes) -> list[tuple[str, bytes]]:
        frame = orjson.loads(payload)
        reply = {"id": frame["id"], "src": "shellyplus1pm-441793d69718", "dst": frame["src"], **next(answers)}
        return [(f"{frame['src']}/rpc", orjson.dumps(reply))]

    device = fake_firmware(f"{prefix}/rpc", shelly)
    async with site.api.client() as http:
        # no tank sensors on a relay: no dry-run refusal without `force`
        r = await http.post(f"/api/v1/devices/{relay}/commands", json={"command": "pump", "state": "on"})
        assert r.status_code == 202, r.text
        first = r.json()["commandId"]
        acked = await wait_command(site, relay, first, "acked")
        r = await http.post(f"/api/v1/devices/{relay}/commands", json={"command": "pump", "state": "off"})
        second = r.json()["commandId"]
        failed = await wait_command(site, relay, second, "failed")
    [(_, request), _] = await device.commands(2)
    frame = orjson.loads(request)
    assert frame == {
        "id": acked["payload"]["rpcId"],
        "src": f"{site.tag}-api/pumps/{relay}",
        "method": "Switch.Set",
        "params": {"id": 0, "on": True},
    }
    assert acked["result"] == {"status": "ok", "data": {"was_on": False}, "commandId": first}
    assert failed["result"]["message"] == doc.SHELLY_ERROR["message"]


# ---- ESPHome ----------------------------------------------------------------------------------------------


async def test_esphome_node_energy_status_and_switch(
    site: Site, publisher: Publisher, fake_firmware: Callable[[str, Reply], FakeFirmware]
) -> None:
    """Plain-text states become full meter readings with register energy; the switch command is confirmed by state."""
    node = unique("node")
    prefix = f"{site.tag}-esp/{node}"
    publisher.publish(f"{prefix}/status", doc.ESPHOME_ONLINE)
    for name, value in doc.ESPHOME_SENSORS.items():
        publisher.publish(f"{prefix}/sensor/{name}/state", value)
    for energy in (b"1.050", b"1.100"):
        publisher.publish(f"{prefix}/sensor/total_daily_energy/state", energy)
    rows = await wait_for_rows(
        site.db,
        "SELECT power_kw, voltage, current, energy_total_kwh FROM meter_readings WHERE meter_id = %s ORDER BY ts",
        (node,),
        6,
    )
    assert rows[-1] == (1.2, 230.5, 5.21, 1.1)
    [(total,)] = query(site.db, "SELECT sum(total_kwh) FROM meter_blocks_30m WHERE meter_id = %s", (node,))
    assert total == pytest.approx(0.1, abs=0.001)  # the register's 1.0 → 1.1 (and milliseconds of 1.2 kW)

    publisher.publish(f"{prefix}/switch/relay/state", doc.ESPHOME_SWITCH_OFF)
    await wait_for_rows(
        site.db, "SELECT 1 FROM devices WHERE device_id = %s AND meta->'adapter' ? 'switch'", (node,), 1
    )
    device = fake_firmware(f"{prefix}/switch/relay/command", lambda t, p: [(f"{prefix}/switch/relay/state", p)])
    async with site.api.client() as http:
        r = await http.post(f"/api/v1/devices/{node}/commands", json={"command": "relay", "state": "on"})
        assert r.status_code == 202, r.text
        await wait_command(site, node, r.json()["commandId"], "acked")
    assert await device.commands(1) == [(f"{prefix}/switch/relay/command", b"ON")]
    publisher.publish(f"{prefix}/status", doc.ESPHOME_OFFLINE)
    await wait_device(site, node, "offline")


async def test_esphome_retained_states_are_not_stored_again(
    site: Site, publisher: Publisher, start_bridge: Callable[[Settings], Any]
) -> None:
    """A bridge (re)subscribing gets the node's retained states replayed: no new readings come of them."""
    node = unique("node")
    prefix = f"{site.tag}-esp/{node}"
    topic = f"{prefix}/sensor/hlw8012_power/state"
    try:
        publisher.publish(f"{prefix}/status", doc.ESPHOME_ONLINE, retain=True)
        publisher.publish(topic, doc.ESPHOME_SENSORS["hlw8012_power"], retain=True)
        await wait_for_rows(site.db, "SELECT 1 FROM meter_readings WHERE meter_id = %s", (node,), 1)
        await start_bridge(replace(site.settings, client_id=unique("bridge")))
        await asyncio.sleep(1.5)  # the second bridge has had the replay; it must have stored nothing
        assert len(query(site.db, "SELECT 1 FROM meter_readings WHERE meter_id = %s", (node,))) == 1
        assert query(site.db, "SELECT status FROM devices WHERE device_id = %s", (node,)) == [("online",)]
    finally:
        publisher.publish(topic, b"", retain=True)
        publisher.publish(f"{prefix}/status", b"", retain=True)


async def test_esphome_garbage_is_dead_lettered(site: Site, publisher: Publisher) -> None:
    """A state that is no number lands in dead_letters with its topic and the device named."""
    node = unique("node")
    topic = f"{site.tag}-esp/{node}/sensor/hlw8012_power/state"
    publisher.publish(topic, b"lots")
    [(reason,)] = await wait_for_rows(site.db, "SELECT reason FROM dead_letters WHERE topic = %s", (topic,), 1)
    assert "not a number" in reason
