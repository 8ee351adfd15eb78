"""Commands end to end: API → broker → a fake device (paho, MQTT 5) → bridge → API."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from psycopg.types.json import Jsonb

from api.commands import _MARK_SENT
from bridge.config import MqttUrl

from .conftest import ApiServer, Publisher, query, unique, wait_for_rows
from .test_api_pump import publish_status, status_doc

pytestmark = pytest.mark.asyncio(loop_scope="session")

Answer = Callable[[dict[str, Any]], dict[str, Any] | None]


def ok(command: dict[str, Any]) -> dict[str, Any]:
    return {"commandId": command["commandId"], "status": "ok", "data": {"applied": command["command"]}}


def silent(command: dict[str, Any]) -> None:
    return None


class FakeDevice:
    """A device on MQTT 5: takes commands on `{prefix}/{id}/cmd`, answers through `answer` after `delay`.

    Like a real MQTT 5 device it answers on the request's response topic with its correlation data.
    """

    def __init__(self, url: str, prefix: str, device_id: str, answer: Answer = ok, delay: float = 0.0) -> None:
        self.topic = f"{prefix}/{device_id}/cmd"
        self.answer, self.delay = answer, delay
        self.received: list[tuple[dict[str, Any], Any]] = []
        self.changed = threading.Condition()
        u = MqttUrl.parse(url)
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id=unique("dev"), protocol=mqtt.MQTTv5
        )
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *args: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(u.host, u.port)
        self.client.loop_start()
        self.client.subscribe(self.topic, qos=1)
        assert subscribed.wait(10), "fake device was not subscribed within 10 s"

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        command = orjson.loads(message.payload)
        with self.changed:
            self.received.append((command, message.properties))
            self.changed.notify_all()
        reply = self.answer(command)
        if reply is None:
            return
        props = message.properties
        topic = getattr(props, "ResponseTopic", None) or f"{self.topic}/result"
        out = Properties(PacketTypes.PUBLISH)
        if getattr(props, "CorrelationData", None):
            out.CorrelationData = props.CorrelationData
        send = lambda: client.publish(topic, orjson.dumps(reply), qos=1, properties=out)  # noqa: E731
        if self.delay:
            threading.Timer(self.delay, send).start()
        else:
            send()

    async def commands(self, count: int, within: float = 10.0) -> list[tuple[dict[str, Any], Any]]:
        """Wait until `count` commands arrived; return all of them."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            with self.changed:
                if len(self.received) >= count:
                    return list(self.received)
            await asyncio.sleep(0.05)
        raise AssertionError(f"expected {count} commands within {within} s, got {self.received}")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def fake_device(mqtt_url: str) -> Iterator[Callable[..., FakeDevice]]:
    """Start fake devices: `fake_device(prefix, device_id, answer=ok, delay=0.0)`; closed after the test."""
    devices: list[FakeDevice] = []

    def start(prefix: str, device_id: str, answer: Answer = ok, delay: float = 0.0) -> FakeDevice:
        dev = FakeDevice(mqtt_url, prefix, device_id, answer, delay)
        devices.append(dev)
        return dev

    yield start
    for dev in devices:
        dev.close()


async def wait_status(http: Any, device_id: str, command_id: str, status: str, within: float = 15.0) -> dict[str, Any]:
    """Poll the command until it reaches `status`; fail with what it was."""
    deadline = time.monotonic() + within
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        r = await http.get(f"/api/v1/devices/{device_id}/commands/{command_id}")
        assert r.status_code == 200, r.text
        body = r.json()
        if body["status"] == status:
            return body
        await asyncio.sleep(0.1)
    raise AssertionError(f"command never reached {status!r} within {within} s: {body}")


async def new_pump(api_server: ApiServer, publisher: Publisher, **status: Any) -> str:
    pump = unique("cmdpump")
    await publish_status(api_server, publisher, status_doc(pump, **status))
    return pump


async def test_pump_command_sent_then_acked(
    api_server: ApiServer, publisher: Publisher, fake_device: Callable[..., FakeDevice]
) -> None:
    """A pump command is answered 202 sent, reaches the device without `force`, and becomes acked with the result."""
    pump = await new_pump(api_server, publisher)
    device = fake_device("pumps", pump, delay=1.5)
    async with api_server.client() as http:
        r = await http.post(f"/api/v1/devices/{pump}/commands", json={"command": "pump", "state": "ON", "force": False})
        assert r.status_code == 202, r.text
        sent = r.json()
        assert sent["status"] == "sent" and sent["deviceId"] == pump and sent["command"] == "pump"
        command_id = sent["commandId"]
        ((got, _),) = await device.commands(1)
        assert got == {"commandId": command_id, "command": "pump", "state": "on"}
        # the device answers 1.5 s later: until then the command stays sent
        assert (await http.get(f"/api/v1/devices/{pump}/commands/{command_id}")).json()["status"] == "sent"
        done = await wait_status(http, pump, command_id, "acked")
    assert done["result"] == {"commandId": command_id, "status": "ok", "data": {"applied": "pump"}}
    assert done["payload"] == got and done["deviceId"] == pump and done["command"] == "pump"
    assert done["createdAt"] <= done["updatedAt"] and done["expiresAt"] > done["createdAt"]


async def test_device_sees_mqtt5_response_topic_and_correlation(
    api_server: ApiServer, publisher: Publisher, fake_device: Callable[..., FakeDevice]
) -> None:
    """The cmd message carries response topic `pumps/{id}/cmd/result` and the command id as correlation data."""
    pump = await new_pump(api_server, publisher)
    device = fake_device("pumps", pump, answer=silent)
    async with api_server.client() as http:
        r = await http.post(f"/api/v1/devices/{pump}/commands", json={"command": "auto_mode", "enabled": True})
        assert r.status_code == 202, r.text
    command_id = r.json()["commandId"]
    ((got, props),) = await device.commands(1)
    assert got == {"commandId": command_id, "command": "auto_mode", "enabled": True}
    assert props.ResponseTopic == f"pumps/{pump}/cmd/result"
    assert props.CorrelationData == command_id.encode()


async def test_answered_command_is_left_alone_by_expiry(
    api_server: ApiServer, publisher: Publisher, fake_device: Callable[..., FakeDevice]
) -> None:
    """A device answering at once ends acked and stays acked past the command timeout."""
    pump = await new_pump(api_server, publisher)
    fake_device("pumps", pump)
    async with api_server.client() as http:
        r = await http.post(f"/api/v1/devices/{pump}/commands", json={"command": "pump", "state": "off"})
        assert r.status_code == 202, r.text
        command_id = r.json()["commandId"]
        await wait_status(http, pump, command_id, "acked")
        await asyncio.sleep(api_server.settings.command_timeout + 1.5)
        assert (await http.get(f"/api/v1/devices/{pump}/commands/{command_id}")).json()["status"] == "acked"


@pytest.mark.parametrize(("before", "after"), [("queued", "sent"), ("acked", "acked"), ("failed", "failed")])
async def test_only_a_queued_command_becomes_sent(apache_url: str, before: str, after: str) -> None:
    """Marking sent after the PUBACK keeps an answer the bridge stored first (the result raced ahead)."""
    command_id = unique("race")
    await asyncio.to_thread(
        query,
        apache_url,
        "INSERT INTO commands (command_id, device_id, kind, command, status, result) "
        "VALUES (%s, 'd', 'pump', 'pump', %s, %s) RETURNING 1",
        (command_id, before, None if before == "queued" else Jsonb({"status": "ok"})),
    )
    assert (await asyncio.to_thread(query, apache_url, _MARK_SENT, (command_id, command_id)))[0][0] == after
    stored = await asyncio.to_thread(
        query, apache_url, "SELECT status FROM commands WHERE command_id = %s", (command_id,)
    )
    assert stored == [(after,)]


async def test_device_error_makes_command_failed(
    api_server: ApiServer, publisher: Publisher, fake_device: Callable[..., FakeDevice]
) -> None:
    """An `error` answer turns the command failed, with the device's message in the result."""
    pump = await new_pump(api_server, publisher)

    def refuse(command: dict[str, Any]) -> dict[str, Any]:
        return {"commandId": command["commandId"], "status": "error", "message": "relay fault"}

    fake_device("pumps", pump, answer=refuse)
    async with api_server.client() as http:
        r = await http.post(f"/api/v1/devices/{pump}/commands", json={"command": "pump", "state": "off"})
        assert r.status_code == 202, r.text
        failed = await wait_status(http, pump, r.json()["commandId"], "failed")
    assert failed["result"]["message"] == "relay fault"


async def test_unanswered_command_expires(
    api_server: ApiServer, publisher: Publisher, fake_device: Callable[..., FakeDevice]
) -> None:
    """A command the device never answers is expired once the command timeout (5 s here) has passed."""
    pump = await new_pump(api_server, publisher)
    device = fake_device("pumps", pump, answer=silent)
    async with api_server.client() as http:
        started = time.monotonic()
        r = await http.post(f"/api/v1/devices/{pump}/commands", json={"command": "reboot", "delaySeconds": 3})
        assert r.status_code == 202, r.text
        command_id = r.json()["commandId"]
        ((got, _),) = await device.commands(1)
        # commands the API does not know are passed through as they are
        assert got == {"commandId": command_id, "command": "reboot", "delaySeconds": 3}
        expired = await wait_status(http, pump, command_id, "expired", within=api_server.settings.command_timeout + 10)
    assert time.monotonic() - started >= api_server.settings.command_timeout - 0.5
    assert expired["result"] is None


async def test_dry_run_protection_and_force(
    api_server: ApiServer, publisher: Publisher, fake_device: Callable[..., FakeDevice]
) -> None:
    """Pump on is 409 below the dry-run level; off is allowed; `force: true` overrides and reaches the device."""
    pump = await new_pump(api_server, publisher, ground=5.0)
    device = fake_device("pumps", pump)
    async with api_server.client() as http:
        r = await http.post(f"/api/v1/devices/{pump}/commands", json={"command": "pump", "state": "on"})
        assert r.status_code == 409, r.text
        err = r.json()["error"]
        assert err["code"] == "conflict"
        assert err["details"]["reason"] == "dry_run"
        assert err["details"]["groundLevelPercent"] == 5.0 and err["details"]["thresholdPercent"] == 10.0

        r = await http.post(f"/api/v1/devices/{pump}/commands", json={"command": "pump", "state": "off"})
        assert r.status_code == 202, r.text
        r = await http.post(f"/api/v1/devices/{pump}/commands", json={"command": "pump", "state": "on", "force": True})
        assert r.status_code == 202, r.text
        forced = r.json()["commandId"]
        received = await device.commands(2)
        await wait_status(http, pump, forced, "acked")
    # the refused command never left the API
    assert [c["state"] for c, _ in received] == ["off", "on"] and received[1][0]["commandId"] == forced
    rows = query(api_server.settings.core.database_url, "SELECT count(*) FROM commands WHERE device_id = %s", (pump,))
    assert rows == [(2,)]


@pytest.mark.parametrize(
    ("status", "reason"),
    [({"sensor_working": False}, "ground_sensor_offline"), ({"connected": False}, "ground_sensor_offline")],
)
async def test_pump_on_refused_while_ground_sensor_offline(
    api_server: ApiServer, publisher: Publisher, status: dict[str, Any], reason: str
) -> None:
    """With a full tank but its ground sensor not working or disconnected, pump on is 409."""
    pump = await new_pump(api_server, publisher, ground=80.0, **status)
    async with api_server.client() as http:
        r = await http.post(f"/api/v1/devices/{pump}/commands", json={"command": "pump", "state": "on"})
    assert r.status_code == 409, r.text
    assert r.json()["error"]["details"]["reason"] == reason


async def test_pump_on_refused_without_any_status(api_server: ApiServer, publisher: Publisher) -> None:
    """A pump that never reported its tanks cannot be started unforced."""
    pump = unique("nostatus")
    publisher.publish(f"pumps/{pump}/online", b"online")
    await wait_for_rows(api_server.settings.core.database_url, "SELECT 1 FROM devices WHERE device_id = %s", (pump,), 1)
    async with api_server.client() as http:
        r = await http.post(f"/api/v1/devices/{pump}/commands", json={"command": "pump", "state": "on"})
        assert r.status_code == 409 and r.json()["error"]["details"]["reason"] == "no_status"
        r = await http.post(f"/api/v1/devices/{pump}/commands", json={"command": "pump", "state": "on", "force": True})
        assert r.status_code == 202, r.text


async def test_command_validation_and_404(api_server: ApiServer, publisher: Publisher) -> None:
    """Malformed commands are 422 with field details; unknown devices and commands are 404."""
    pump = await new_pump(api_server, publisher)
    async with api_server.client() as http:
        for body, field in [
            ({"command": "pump"}, "state"),
            ({"command": "pump", "state": "maybe"}, "state"),
            ({"command": "auto_mode", "enabled": "yes"}, "enabled"),
            ({"state": "on"}, "command"),
            ({"command": "pump", "state": "on", "force": "yes"}, "force"),
        ]:
            r = await http.post(f"/api/v1/devices/{pump}/commands", json=body)
            assert r.status_code == 422, (body, r.text)
            assert field in {d["field"] for d in r.json()["error"]["details"]}
        r = await http.post(f"/api/v1/devices/{unique('ghost')}/commands", json={"command": "pump", "state": "off"})
        assert r.status_code == 404
        r = await http.get(f"/api/v1/devices/{pump}/commands/no-such-command")
        assert r.status_code == 404
    assert query(api_server.settings.core.database_url, "SELECT 1 FROM commands WHERE device_id = %s", (pump,)) == []


async def test_command_list_newest_first(
    api_server: ApiServer, publisher: Publisher, fake_device: Callable[..., FakeDevice]
) -> None:
    """GET …/commands lists the device's commands newest first, paged."""
    pump = await new_pump(api_server, publisher)
    fake_device("pumps", pump, answer=silent)
    async with api_server.client() as http:
        ids = []
        for state in ("off", "on", "off"):
            r = await http.post(f"/api/v1/devices/{pump}/commands", json={"command": "pump", "state": state})
            assert r.status_code == 202, r.text
            ids.append(r.json()["commandId"])
        listed = (await http.get(f"/api/v1/devices/{pump}/commands")).json()
        assert [c["commandId"] for c in listed] == ids[::-1]
        page = (await http.get(f"/api/v1/devices/{pump}/commands", params={"limit": 1, "offset": 1})).json()
        assert [c["commandId"] for c in page] == [ids[1]]


async def test_live_clients_get_command_results(
    api_server: ApiServer, publisher: Publisher, fake_device: Callable[..., FakeDevice]
) -> None:
    """A WebSocket client subscribed to the device gets `command_result` for an ack and for an expiry."""
    from websockets.asyncio.client import connect

    from .conftest import API_TOKEN

    pump = await new_pump(api_server, publisher)
    device = fake_device("pumps", pump, delay=0.5)

    async def next_result(conn: Any, command_id: str, within: float) -> dict[str, Any]:
        async def scan() -> dict[str, Any]:
            while True:
                msg = orjson.loads(await conn.recv())
                if msg.get("type") == "command_result" and msg.get("commandId") == command_id:
                    return msg

        return await asyncio.wait_for(scan(), within)

    async with connect(f"{api_server.ws_url}?token={API_TOKEN}", open_timeout=10) as conn:
        await conn.send(orjson.dumps({"type": "subscribe_device", "deviceId": pump}).decode())
        async with api_server.client() as http:
            r = await http.post(f"/api/v1/devices/{pump}/commands", json={"command": "pump", "state": "off"})
            assert r.status_code == 202, r.text
            acked = await next_result(conn, r.json()["commandId"], 15)
            assert acked == {
                "type": "command_result",
                "commandId": r.json()["commandId"],
                "deviceId": pump,
                "command": "pump",
                "status": "acked",
                "result": {"commandId": r.json()["commandId"], "status": "ok", "data": {"applied": "pump"}},
            }
            device.answer = silent
            r = await http.post(f"/api/v1/devices/{pump}/commands", json={"command": "auto_mode", "enabled": False})
            assert r.status_code == 202, r.text
            expired = await next_result(conn, r.json()["commandId"], api_server.settings.command_timeout + 10)
    assert expired["status"] == "expired" and expired["deviceId"] == pump and expired["result"] is None
