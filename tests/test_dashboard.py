"""The dashboard page at `/`: served publicly, and driven in a real headless Chromium (Debian's `chromium`)
against the real API, bridge, broker and database."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import tempfile
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from bridge.config import MqttUrl

from .conftest import API_TOKEN, ApiServer, Publisher, query, room_in_block, unique, wait_for_rows

pytestmark = pytest.mark.asyncio(loop_scope="session")

CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 10_000
SCREENSHOT = "/tmp/dashboard.png"
# every state the connection indicator goes through from now on, in window.__states
RECORD_STATES = """() => {
  window.__states = [];
  const el = document.getElementById("connection");
  new MutationObserver(() => {
    const s = el.dataset.state;
    if (window.__states[window.__states.length - 1] !== s) window.__states.push(s);
  }).observe(el, { attributes: true, attributeFilter: ["data-state"] });
}"""


def _require_chromium() -> None:
    if os.path.exists(CHROMIUM):
        return
    message = f"{CHROMIUM} is missing: scripts/setup installs Debian's chromium"
    if os.environ.get("CI_REQUIRE_SERVICES") == "1":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    """Chromium with a fresh profile, driven by Playwright (which never downloads a browser of its own here)."""
    _require_chromium()
    from playwright.async_api import async_playwright

    with tempfile.TemporaryDirectory(prefix="dashboard-profile-") as profile:
        async with async_playwright() as pw:
            # Playwright adds --headless itself, and refuses --user-data-dir in args: the profile is the first argument
            context = await pw.chromium.launch_persistent_context(
                profile,
                executable_path=CHROMIUM,
                headless=True,
                args=CHROMIUM_FLAGS,
                viewport={"width": 1400, "height": 1000},
            )
            try:
                yield context
            finally:
                await context.close()


async def publish(publisher: Publisher, topic: str, payload: dict[str, Any]) -> None:
    await asyncio.to_thread(publisher.publish, topic, orjson.dumps(payload))


def pump_status(running: bool, ground: float, roof: float, amps: float) -> dict[str, Any]:
    return {
        "timestamp": datetime.now(UTC).isoformat(),
        "ground_tank": {"level_percent": ground, "sensor_working": True, "connected": True},
        "roof_tank": {"level_percent": roof, "sensor_working": True},
        "pump": {"running": running, "current_amps": amps},
        "system": {"auto_mode_enabled": False, "manual_pump_control": True},
    }


class PumpController:
    """A stand-in pump controller: answers `pump` commands on `cmd/result` and reports its new state."""

    def __init__(self, url: str, device_id: str) -> None:
        self.device_id = device_id
        self.commands: list[dict[str, Any]] = []
        u = MqttUrl.parse(url)
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=unique("ctl"))
        self.client.on_message = self._on_message
        self.subscribed = asyncio.get_running_loop().create_future()
        loop = asyncio.get_running_loop()
        self.client.on_subscribe = lambda *a: loop.call_soon_threadsafe(
            lambda: self.subscribed.done() or self.subscribed.set_result(True)
        )
        self.client.connect(u.host, u.port)
        self.client.subscribe(f"pumps/{device_id}/cmd", qos=1)
        self.client.loop_start()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        command = orjson.loads(msg.payload)
        self.commands.append(command)
        running = command.get("state") == "on"
        result = {"commandId": command["commandId"], "status": "ok", "message": f"pump {command.get('state')}"}
        client.publish(f"pumps/{self.device_id}/cmd/result", orjson.dumps(result), qos=1)
        status = pump_status(running, 63.0, 41.5, 5.1 if running else 0.0)
        client.publish(f"pumps/{self.device_id}/status", orjson.dumps(status), qos=1)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


async def test_page_and_assets_are_public_and_data_is_not(api_server: ApiServer) -> None:
    """`/` and `/static/*` answer without a token (with the site's zone and a CSP); data and unknown files do not."""
    import httpx

    async with httpx.AsyncClient(base_url=api_server.base_url, timeout=10) as anon:
        page = await anon.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert '<meta name="site-timezone" content="Europe/Berlin">' in page.text
        assert '<meta name="peak-window" content="14:00-22:00">' in page.text
        assert "connect-src 'self'" in page.headers["content-security-policy"]
        for asset, kind in (("/static/app.js", "javascript"), ("/static/style.css", "text/css")):
            r = await anon.get(asset)
            assert r.status_code == 200, asset
            assert kind in r.headers["content-type"]
        assert (await anon.get("/static/nope.js")).status_code == 404
        assert (await anon.get("/static/%2e%2e/dashboard.py")).status_code == 404
        assert (await anon.get("/api/vehicles")).status_code == 401
        assert (await anon.get("/api/meters")).status_code == 401


async def test_vehicle_list(api_server: ApiServer, publisher: Publisher, apache_url: str) -> None:
    """`GET /api/vehicles` lists a vehicle with its latest reading, shaped like `/api/meters`."""
    vehicle = unique("v-list")
    stamp = datetime.now(UTC).replace(microsecond=0)
    await publish(
        publisher, f"vehicles/{vehicle}/reading", {"soc": 42.0, "batteryTemp": 31.5, "timestamp": stamp.isoformat()}
    )
    await wait_for_rows(apache_url, "SELECT 1 FROM vehicle_latest WHERE vehicle_id = %s", (vehicle,), 1)
    async with api_server.client() as client:
        found = None
        for offset in range(0, 100_000, 1000):
            r = await client.get("/api/vehicles", params={"limit": 1000, "offset": offset})
            assert r.status_code == 200
            page = r.json()
            found = next((v for v in page if v["deviceId"] == vehicle), None)
            if found or len(page) < 1000:
                break
        total = int(r.headers["X-Total-Count"])
    assert total >= 1
    assert found is not None
    assert found["status"] == "online"
    assert found["lastSeen"]
    reading = found["lastReading"]
    assert datetime.fromisoformat(reading["timestamp"]) == stamp
    assert reading["soc"] == 42.0 and reading["batteryTemp"] == 31.5 and reading["kwhDeliveredDc"] is None


async def test_dashboard_in_chromium(
    api_server: ApiServer, publisher: Publisher, apache_url: str, mqtt_url: str, browser: Any
) -> None:
    """Headless Chromium shows a meter's power and block, a pump's tanks, a vehicle's efficiency; live updates
    arrive without a reload; the pump button sends a command and the page shows it acknowledged."""
    from playwright.async_api import expect

    meter, interval_meter = unique("m-dash"), unique("m-dash-ac")
    pump, vehicle = unique("p-dash"), unique("v-dash")
    # both meter readings (now, now + 30 s) and the checks after them fall in one block that has begun:
    # blocks/today stops at the server's clock, so a reading stamped into the next block would be missing
    await room_in_block(before_end=120.0)
    now = datetime.now(UTC).replace(microsecond=0)

    # before the page opens: a meter reading, a pump status, a vehicle charging from a correlated meter
    await publish(publisher, f"meters/{meter}/reading", {"totalPowerKw": 42.5, "timestamp": now.isoformat()})
    await publish(publisher, f"pumps/{pump}/status", pump_status(False, 63.5, 41.2, 0.0))
    await publish(publisher, f"meters/{interval_meter}/reading", {"kwhConsumedAc": 10.0, "timestamp": now.isoformat()})
    await publish(
        publisher, f"vehicles/{vehicle}/reading", {"soc": 40.0, "kwhDeliveredDc": 5.0, "timestamp": now.isoformat()}
    )
    async with api_server.client() as client:
        r = await client.post("/v1/ingestion/correlate", json={"vehicleId": vehicle, "meterId": interval_meter})
        assert r.status_code == 201
    await wait_for_rows(apache_url, "SELECT 1 FROM meter_latest WHERE meter_id = %s", (meter,), 1)
    await wait_for_rows(apache_url, "SELECT 1 FROM pump_latest WHERE device_id = %s", (pump,), 1)
    await wait_for_rows(apache_url, "SELECT 1 FROM vehicle_latest WHERE vehicle_id = %s", (vehicle,), 1)
    controller = PumpController(mqtt_url, pump)
    await asyncio.wait_for(controller.subscribed, 10)

    try:
        page = await browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        await page.goto(f"{api_server.base_url}/?token={API_TOKEN}&meter={meter}")

        await expect(page.locator("#connection")).to_have_text("connected", timeout=WAIT_MS)
        assert "token=" not in page.url  # taken out of the address bar once read

        row = page.locator(f'#meters tr[data-meter-id="{meter}"]')
        await expect(row.locator(".power")).to_have_text("42.50", timeout=WAIT_MS)
        async with api_server.client() as client:
            block = (await client.get(f"/api/meters/{meter}/current-block")).json()
        start = datetime.fromisoformat(block["start"]).astimezone(ZoneInfo("Europe/Berlin"))
        assert block["readingCount"] == 1
        await expect(row.locator(".count")).to_have_text("1", timeout=WAIT_MS)
        await expect(row.locator(".kwh")).to_have_text(f"{block['totalKwh']:.3f}", timeout=WAIT_MS)
        peak = "peak" if block["isPeakHour"] else "off-peak"
        await expect(row.locator(".peak")).to_have_text(f"{start:%H:%M} {peak}", timeout=WAIT_MS)
        await expect(row).to_have_class(re.compile(r"\bselected\b"), timeout=WAIT_MS)
        await expect(page.locator("#chart rect.bar")).not_to_have_count(0, timeout=WAIT_MS)

        card = page.locator(f'.pump[data-pump-id="{pump}"]')
        await expect(card.locator('.tank[data-tank="ground"] .tank-value')).to_have_text("63.5%", timeout=WAIT_MS)
        await expect(card.locator('.tank[data-tank="roof"] .tank-value')).to_have_text("41.2%", timeout=WAIT_MS)
        await expect(card.locator(".pump-state")).to_have_text("stopped")
        button = card.locator(".pump-toggle")
        await expect(button).to_have_text("Turn on")

        vrow = page.locator(f'#vehicles tr[data-vehicle-id="{vehicle}"]')
        await expect(vrow.locator(".soc")).to_have_text("40.0", timeout=WAIT_MS)
        await expect(vrow.locator(".eff")).to_have_text("0.500", timeout=WAIT_MS)  # 5 kWh DC of 10 kWh AC

        # live, without a reload: a new meter reading and a vehicle reading pushed over MQTT
        await page.evaluate("window.__sameDocument = true")
        later = now + timedelta(seconds=30)
        await publish(publisher, f"meters/{meter}/reading", {"totalPowerKw": 77.25, "timestamp": later.isoformat()})
        await publish(
            publisher,
            f"vehicles/{vehicle}/reading",
            {"soc": 61.0, "kwhDeliveredDc": 3.0, "timestamp": later.isoformat()},
        )
        await expect(row.locator(".power")).to_have_text("77.25", timeout=WAIT_MS)
        async with api_server.client() as client:
            today = (await client.get(f"/api/meters/{meter}/blocks/today")).json()
        total = sum(b["totalKwh"] for b in today)
        await expect(page.locator("#chart-total")).to_contain_text(f"{total:.3f} kWh today", timeout=WAIT_MS)
        if datetime.fromisoformat(block["end"]) > later:
            await expect(row.locator(".count")).to_have_text("2", timeout=WAIT_MS)
        await expect(vrow.locator(".soc")).to_have_text("61.0", timeout=WAIT_MS)
        await expect(vrow.locator(".eff")).to_have_text("0.800", timeout=WAIT_MS)
        await expect(vrow.locator(".health")).to_have_text("fault suspected", timeout=WAIT_MS)
        assert await page.evaluate("window.__sameDocument") is True

        # an alert the bridge raises shows up as it arrives (built-in rule: ground tank below 15 % is critical)
        dry = unique("p-dash-dry")
        await publish(publisher, f"pumps/{dry}/status", pump_status(False, 8.0, 50.0, 0.0))
        # .first: on a broker shared with other test sessions, their bridges may raise the same alert too
        alert = page.locator("#alerts li.alert", has_text=dry).first
        await expect(alert).to_have_attribute("data-type", "low_water", timeout=WAIT_MS)
        await expect(alert.locator(".alert-sev")).to_have_text("critical")
        await expect(alert.locator(".alert-text")).to_contain_text("low water")
        # and the controller it came from is listed at once, its ground tank at 8 %
        dry_card = page.locator(f'.pump[data-pump-id="{dry}"]')
        await expect(dry_card.locator('.tank[data-tank="ground"] .tank-value')).to_have_text("8.0%", timeout=WAIT_MS)

        # the pump button: a command goes out, the controller answers, the page shows both
        await button.click()
        status = card.locator(".cmd-status")
        await expect(status).to_have_attribute("data-status", "acked", timeout=WAIT_MS)
        await expect(status).to_have_text("pump on: acked — pump on")
        await expect(card.locator(".pump-state")).to_have_text("running", timeout=WAIT_MS)
        await expect(card.locator(".pump-amps")).to_have_text("5.10 A")
        await expect(button).to_have_text("Turn off")
        rows = query(
            apache_url,
            "SELECT command, payload->>'state', status FROM commands WHERE device_id = %s",
            (pump,),
        )
        assert rows == [("pump", "on", "acked")]
        assert [c["state"] for c in controller.commands] == ["on"]

        await page.evaluate("window.scrollTo(0, 0)")
        await page.screenshot(path=SCREENSHOT, full_page=True)
        assert errors == []

        # a tab without the token asks for one, and connects once given it; its WebSocket runs through a
        # Playwright route, so the test can cut it and watch the page reconnect
        bare = await browser.new_page()
        sockets: list[Any] = []

        def relay(ws: Any) -> None:
            ws.connect_to_server()
            sockets.append(ws)

        await bare.route_web_socket(re.compile(r"/ws(\?|$)"), relay)
        await bare.goto(f"{api_server.base_url}/?meter={meter}")
        await expect(bare.locator("#login")).to_be_visible(timeout=WAIT_MS)
        await expect(bare.locator("#connection")).to_have_attribute("data-state", "unauthorized")
        await bare.fill("#login-token", API_TOKEN)
        await bare.click("#login button[type=submit]")
        await expect(bare.locator("#connection")).to_have_text("connected", timeout=WAIT_MS)
        await expect(bare.locator("#login")).to_be_hidden()

        await bare.evaluate(RECORD_STATES)
        connected = len(sockets)
        await sockets[-1].close(code=1012, reason="restarting")
        await expect(bare.locator("#connection")).to_have_text("connected", timeout=WAIT_MS)
        assert len(sockets) == connected + 1
        states = await bare.evaluate("window.__states")
        assert states[0] == "reconnecting" and states[-1] == "connected", states
        # the new connection registered again: live updates flow as before
        latest = now + timedelta(seconds=60)
        await publish(publisher, f"meters/{meter}/reading", {"totalPowerKw": 12.75, "timestamp": latest.isoformat()})
        bare_row = bare.locator(f'#meters tr[data-meter-id="{meter}"]')
        await expect(bare_row.locator(".power")).to_have_text("12.75", timeout=WAIT_MS)
    finally:
        controller.close()


async def test_dashboard_switches_a_simulated_pump(
    api_server: ApiServer, mqtt_url: str, apache_url: str, browser: Any
) -> None:
    """The pump button on the page switches a firmware-sim pump: its own status then reports the new state."""
    from firmware_sim import SimConfig, Simulation
    from playwright.async_api import expect

    from bridge.config import MqttUrl

    prefix = unique("dash")
    config = SimConfig(mqtt=MqttUrl.parse(mqtt_url), meters=0, vehicles=0, pumps=1, interval=1.0, prefix=prefix)
    pump = f"{prefix}-pump-001"
    stop = asyncio.Event()
    async with Simulation(config) as sim:
        task = asyncio.create_task(sim.run(stop))
        try:
            await wait_for_rows(apache_url, "SELECT 1 FROM pump_latest WHERE device_id = %s", (pump,), 1, within=20)
            page = await browser.new_page()
            await page.goto(f"{api_server.base_url}/?token={API_TOKEN}")
            card = page.locator(f'.pump[data-pump-id="{pump}"]')
            state = card.locator(".pump-state")
            await expect(state).to_have_text(re.compile("running|stopped"), timeout=WAIT_MS)
            before = await state.inner_text()
            after = "stopped" if before == "running" else "running"
            await card.locator(".pump-toggle").click()
            await expect(card.locator(".cmd-status")).to_have_attribute("data-status", "acked", timeout=WAIT_MS)
            await expect(state).to_have_text(after, timeout=WAIT_MS)
            rows = await wait_for_rows(
                apache_url,
                "SELECT 1 FROM pump_latest WHERE device_id = %s AND pump_running = %s",
                (pump, after == "running"),
                1,
            )
            assert rows
        finally:
            stop.set()
            await asyncio.wait_for(task, 20)
