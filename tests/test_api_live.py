"""WebSocket `/ws` against the real API, bridge, broker and database; the slow-client rule on the hub itself."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from api.config import ApiSettings
from api.live import Hub

from .conftest import API_TOKEN, ApiServer, Publisher, unique, wait_for_rows

pytestmark = pytest.mark.asyncio(loop_scope="session")
WAIT = 15.0


def ws(api_server: ApiServer) -> Any:
    return connect(api_server.ws_url + "?token=" + API_TOKEN, open_timeout=10)


async def send(conn: ClientConnection, message: Any) -> None:
    await conn.send(message if isinstance(message, str | bytes) else orjson.dumps(message).decode())


async def next_of(
    conn: ClientConnection, type_: str, where: Callable[[dict[str, Any]], bool] = lambda m: True, within: float = WAIT
) -> dict[str, Any]:
    """The next message of `type_` matching `where`, skipping others (the test DB is shared)."""

    async def scan() -> dict[str, Any]:
        while True:
            msg = orjson.loads(await conn.recv())
            if msg.get("type") == type_ and where(msg):
                return msg

    return await asyncio.wait_for(scan(), within)


async def publish(publisher: Publisher, topic: str, payload: Any, retain: bool = False) -> None:
    data = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    await asyncio.to_thread(publisher.publish, topic, data, 1, retain)


def pump_status(running: bool, ground: float) -> dict[str, Any]:
    return {
        "ground_tank": {"level_percent": ground, "sensor_working": True},
        "roof_tank": {"level_percent": 40.0},
        "pump": {"running": running, "current_amps": 3.5},
        "system": {"auto_mode_enabled": True},
    }


async def test_dashboard_gets_update_with_current_block(api_server: ApiServer, publisher: Publisher) -> None:
    """A registered dashboard gets `dashboard:update` with the reading's block totals (60 kW held 5 min = 5 kWh)."""
    meter = unique("m-dash")
    # two hours ago, one minute into a block: the 5-minute power hold lies wholly inside that block
    start = datetime.fromtimestamp((time.time() - 7200) // 1800 * 1800, UTC)
    stamp = start + timedelta(minutes=1)
    async with ws(api_server) as conn:
        await send(conn, {"type": "dashboard:register"})
        registered = await next_of(conn, "dashboard:registered")
        assert isinstance(registered["meters"], list)
        assert set(registered["blockInfo"]) == {"start", "end", "isPeakHour", "minutesRemaining"}

        await publish(publisher, f"meters/{meter}/reading", {"totalPowerKw": 60.0, "timestamp": stamp.isoformat()})
        update = await next_of(conn, "dashboard:update", lambda m: m["meter"]["deviceId"] == meter)

    local = start.astimezone(ZoneInfo("Europe/Berlin"))
    peak = 14 <= local.hour < 22
    assert update["meter"]["status"] == "online"
    assert update["meter"]["lastSeen"]
    assert update["reading"]["totalPowerKw"] == 60.0
    assert datetime.fromisoformat(update["reading"]["timestamp"]) == stamp
    block = update["currentBlock"]
    assert block["deviceId"] == meter
    assert datetime.fromisoformat(block["start"]) == start
    assert datetime.fromisoformat(block["end"]) == start + timedelta(minutes=30)
    assert block["isPeakHour"] is peak
    assert block["totalKwh"] == pytest.approx(5.0)
    assert block["readingCount"] == 1
    info = update["blockInfo"]
    assert (info["start"], info["end"], info["isPeakHour"]) == (block["start"], block["end"], peak)
    assert info["minutesRemaining"] == 0  # that block is over


async def test_subscribe_device_gets_status_and_events(api_server: ApiServer, publisher: Publisher) -> None:
    """`subscribe_device` brings pump `device_update` and `pump_event`; a late subscriber gets the latest status."""
    pump = unique("p-sub")
    async with ws(api_server) as conn:
        await send(conn, {"type": "subscribe_device", "deviceId": pump})
        assert (await next_of(conn, "subscribed"))["deviceId"] == pump

        await publish(publisher, f"pumps/{pump}/status", pump_status(True, 55.5))
        update = await next_of(conn, "device_update")
        assert update["deviceId"] == pump
        assert update["data"]["device_id"] == pump
        assert update["data"]["pump"]["running"] is True
        assert update["data"]["ground_tank"]["level_percent"] == 55.5
        assert update["timestamp"] == update["data"]["timestamp"]

        await publish(publisher, f"pumps/{pump}/event", {"event": "pump_started", "reason": "level low"})
        event = await next_of(conn, "pump_event")
        assert event["deviceId"] == pump
        assert event["data"]["event"] == "pump_started"
        assert event["data"]["reason"] == "level low"

        await send(conn, {"type": "unsubscribe_device", "deviceId": pump})
        await next_of(conn, "unsubscribed")
        await publish(publisher, f"pumps/{pump}/status", pump_status(False, 54.0))
        with pytest.raises(TimeoutError):
            await next_of(conn, "device_update", within=1.5)

    async with ws(api_server) as late:
        await send(late, {"type": "subscribe_device", "deviceId": pump})
        await next_of(late, "subscribed")
        current = await next_of(late, "device_update", within=5)
        assert current["deviceId"] == pump
        assert current["data"]["pump"]["running"] is False  # the latest stored status
        await send(late, {"type": "get_current_status", "deviceId": pump})
        again = await next_of(late, "device_update", within=5)
        assert again["data"] == current["data"]


async def test_meter_room_gets_reading_updates(api_server: ApiServer, publisher: Publisher) -> None:
    """A client in room `meter-<id>` gets `meter-reading-update`; a client in another meter's room does not."""
    meter, other = unique("m-room"), unique("m-room")
    async with ws(api_server) as conn, ws(api_server) as elsewhere:
        await send(conn, {"type": "join-room", "room": f"meter-{meter}"})
        assert (await next_of(conn, "joined"))["room"] == f"meter-{meter}"
        await send(elsewhere, {"type": "join-room", "room": f"meter-{other}"})
        await next_of(elsewhere, "joined")

        await publish(publisher, f"meters/{meter}/reading", {"totalPowerKw": 12.5, "voltage": 230.0})
        update = await next_of(conn, "meter-reading-update")
        assert update["meterId"] == meter
        assert update["reading"]["totalPowerKw"] == 12.5
        assert update["reading"]["voltage"] == 230.0
        assert datetime.fromisoformat(update["reading"]["timestamp"]).tzinfo is not None
        with pytest.raises(TimeoutError):
            await next_of(elsewhere, "meter-reading-update", within=1.0)


async def test_offline_will_is_pushed(api_server: ApiServer, publisher: Publisher) -> None:
    """A retained `offline` will: `device_offline` to subscribers and dashboards, `meter-status-change` to the room."""
    meter = unique("m-off")
    async with ws(api_server) as conn, ws(api_server) as dash:
        await send(conn, {"type": "subscribe_device", "deviceId": meter})
        await next_of(conn, "subscribed")
        await send(conn, {"type": "join-room", "room": f"meter-{meter}"})
        await next_of(conn, "joined")
        await send(dash, {"type": "dashboard:register"})
        await next_of(dash, "dashboard:registered")

        await publish(publisher, f"meters/{meter}/reading", {"totalPowerKw": 1.0})
        await next_of(conn, "meter-reading-update")  # the meter exists and is online
        try:
            await publish(publisher, f"meters/{meter}/online", b"offline", retain=True)
            offline = await next_of(conn, "device_offline")
            assert (offline["deviceId"], offline["kind"]) == (meter, "meter")
            change = await next_of(conn, "meter-status-change")
            assert (change["meterId"], change["status"]) == (meter, "offline")
            seen = await next_of(dash, "device_offline", lambda m: m["deviceId"] == meter)
            assert seen["kind"] == "meter"
            await next_of(dash, "meter-status-change", lambda m: m["meterId"] == meter)
        finally:
            await publish(publisher, f"meters/{meter}/online", b"", retain=True)  # clear the retained will


async def test_simulator_reading_is_stored(api_server: ApiServer, apache_url: str) -> None:
    """`simulator:reading` over the WebSocket is published like HTTP ingestion and lands in meter_readings."""
    meter = unique("m-sim")
    stamp = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=5)
    async with ws(api_server) as conn:
        await send(conn, {"type": "simulator:register", "deviceId": meter})
        assert (await next_of(conn, "simulator:registered"))["deviceId"] == meter
        reading = {
            "type": "simulator:reading",
            "deviceId": meter,
            "totalPowerKw": 42.5,
            "timestamp": int(stamp.timestamp() * 1000),
            "frequency": 50.02,
        }
        await send(conn, reading)
        ack = await next_of(conn, "simulator:ack")
        assert ack["deviceId"] == meter
        assert ack["status"] == "accepted"
        assert datetime.fromisoformat(ack["timestamp"]) == stamp

        # a reading without an id is the registered simulator's
        await send(conn, {"type": "simulator:reading", "totalPowerKw": 43.0})
        assert (await next_of(conn, "simulator:ack"))["deviceId"] == meter

        await send(conn, {"type": "simulator:reading", "deviceId": meter, "totalPowerKw": "lots", "frequency": -1})
        error = await next_of(conn, "error")
        assert error["error"]["code"] == "validation_error"
        assert error["request"] == "simulator:reading"
        fields = {d["field"] for d in error["error"]["details"]}
        assert {"totalPowerKw", "frequency"} <= fields

    rows = await wait_for_rows(
        apache_url, "SELECT power_kw, frequency FROM meter_readings WHERE meter_id = %s AND ts = %s", (meter, stamp), 1
    )
    assert rows == [(42.5, 50.02)]
    await wait_for_rows(apache_url, "SELECT 1 FROM meter_readings WHERE meter_id = %s", (meter,), 2)


async def test_bad_messages_get_errors_and_connection_stays(api_server: ApiServer) -> None:
    """Bad JSON, a missing or unknown type and a bad device id each get an `error`; the connection stays usable."""
    async with ws(api_server) as conn:
        await send(conn, "this is not json")
        assert (await next_of(conn, "error"))["error"]["code"] == "bad_request"
        await send(conn, {"deviceId": "x"})
        assert (await next_of(conn, "error"))["error"]["code"] == "bad_request"
        await send(conn, {"type": "make_coffee"})
        unknown = await next_of(conn, "error")
        assert unknown["request"] == "make_coffee"
        assert "subscribe_device" in unknown["error"]["details"]["known"]
        await send(conn, {"type": "subscribe_device", "deviceId": "no spaces allowed"})
        assert (await next_of(conn, "error"))["error"]["code"] == "validation_error"
        await send(conn, {"type": "get_current_status", "deviceId": unique("nobody")})
        assert (await next_of(conn, "error"))["error"]["code"] == "not_found"
        await send(conn, b'{"type": "join-room", "room": "meter-bytes-ok"}')
        assert (await next_of(conn, "joined"))["room"] == "meter-bytes-ok"


async def test_unauthorized_websocket_is_refused(api_server: ApiServer) -> None:
    """Without a token, or with a wrong one, the handshake is refused."""
    for url in (api_server.ws_url, api_server.ws_url + "?token=wrong"):
        with pytest.raises(InvalidStatus) as refused:
            async with connect(url, open_timeout=10):
                pass
        assert refused.value.response.status_code == 403
    async with connect(api_server.ws_url, additional_headers=api_server.headers, open_timeout=10) as conn:
        await send(conn, {"type": "join-room", "room": "meter-header-auth"})
        await next_of(conn, "joined")


class FakeSocket:
    """A transport for the hub alone: records what it got; a stuck one never finishes a send."""

    def __init__(self, stuck: bool = False) -> None:
        self.stuck = stuck
        self.sent: list[dict[str, Any]] = []
        self.closed: tuple[int, str | None] | None = None

    async def send_text(self, data: str) -> None:
        if self.stuck:
            await asyncio.Event().wait()
        self.sent.append(orjson.loads(data))

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        self.closed = (code, reason)


async def test_slow_client_is_dropped_and_others_keep_receiving() -> None:
    """A client that does not take its messages is closed with 1013 while a normal client gets every message."""
    hub = Hub(ApiSettings(ws_queue=4), None, None)  # type: ignore[arg-type]  # no database or MQTT needed here
    async with hub:
        slow_socket, fast_socket = FakeSocket(stuck=True), FakeSocket()
        slow, fast = hub.connect(slow_socket), hub.connect(fast_socket)
        for client in (slow, fast):
            await hub.handle(client, '{"type": "join-room", "room": "meter-x"}')
        started = time.monotonic()
        for i in range(20):
            await asyncio.wait_for(hub.push_room("meter-x", {"type": "meter-reading-update", "n": i}), 1)
            await asyncio.sleep(0.001)
        assert time.monotonic() - started < 2  # the stuck client never held anyone up
        for _ in range(100):
            if slow_socket.closed and len(fast_socket.sent) == 21:
                break
            await asyncio.sleep(0.01)
        assert slow_socket.closed == (1013, "too slow")
        assert slow not in hub.clients and "meter-x" in hub.rooms and hub.rooms["meter-x"] == {fast}
        assert hub.count == 1
        assert [m.get("n") for m in fast_socket.sent[1:]] == list(range(20))
        assert fast_socket.sent[0] == {"type": "joined", "room": "meter-x"}
    assert fast_socket.closed == (1001, "server shutting down")


async def test_ems_clients_find_the_websocket_at_the_root(api_server: ApiServer) -> None:
    """EMS connected at `/`: the same hub answers there, with EMS's `dashboard:initial`; no token, no socket."""
    import json as _json

    from websockets.asyncio.client import connect

    root = api_server.base_url.replace("http://", "ws://") + "/"
    async with connect(f"{root}?token={API_TOKEN}") as ws:
        await ws.send(_json.dumps({"type": "dashboard:register"}))
        seen: list[str] = []
        while "dashboard:initial" not in seen:
            seen.append(_json.loads(await asyncio.wait_for(ws.recv(), 10))["type"])
        assert "dashboard:registered" in seen
    with pytest.raises(Exception):  # noqa: B017 — the handshake is refused (403)
        async with connect(root):
            pass
