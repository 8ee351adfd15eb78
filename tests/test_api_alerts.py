"""Alerts through the API: live `alert_triggered` to dashboards, rules over REST, the alert list, the log, ack."""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from api.alerts import device_health

from .conftest import ApiServer, Publisher, unique, wait_for_rows
from .test_alerts import publish, pump_doc, stamp
from .test_api_live import next_of, send, ws

pytestmark = pytest.mark.asyncio(loop_scope="session")
WAIT = 15.0


async def test_dashboard_sees_a_pump_running_dry_within_a_second(api_server: ApiServer, publisher: Publisher) -> None:
    """A pump running dry: dashboards and its subscribers get `alert_triggered` within 1 s, then `alert_resolved`."""
    pump = unique("p-live")
    async with ws(api_server) as dash, ws(api_server) as sub:
        await send(dash, {"type": "dashboard:register"})
        await next_of(dash, "dashboard:registered")
        await send(sub, {"type": "subscribe_device", "deviceId": pump})
        await next_of(sub, "subscribed")

        started = time.monotonic()
        await publish(publisher, f"pumps/{pump}/status", pump_doc(ground=4.0, running=True, runtime=3.0))
        seen = await next_of(dash, "alert_triggered", lambda m: m["deviceId"] == pump, within=WAIT)
        latency = time.monotonic() - started
        assert latency < 1.0, f"alert_triggered after {latency:.3f} s"
        assert (seen["device_id"], seen["alert_type"], seen["severity"]) == (pump, "low_water", "critical")
        assert "below 15 %" in seen["message"] and seen["timestamp"]
        assert seen["alert"]["state"] == "active" and seen["alert"]["value"] == 4.0
        mine = await next_of(sub, "alert_triggered")
        assert (mine["deviceId"], mine["alert_type"]) == (pump, "low_water")

        await publish(publisher, f"pumps/{pump}/status", pump_doc(ground=55.0))
        done = await next_of(dash, "alert_resolved", lambda m: m["deviceId"] == pump)
        # ids are per database: other test sessions' bridges on this broker may announce the same device
        assert (done["alert_type"], done["alert"]["resolvedValue"]) == ("low_water", 55.0)
        await next_of(sub, "alert_resolved")


async def test_silent_meter_alert_and_status_changes(
    api_server: ApiServer, publisher: Publisher, start_bridge: Any
) -> None:
    """A meter gone silent: `meter-status-change` offline and `alert_triggered`; back: online and `alert_resolved`."""
    # a second bridge with a short silence timeout beside the server's (both store; repeats are absorbed)
    await start_bridge(replace(api_server.settings.core, client_id=unique("bridge"), offline_after=1.0))
    meter = unique("m-silent")
    async with ws(api_server) as dash, ws(api_server) as room:
        await send(dash, {"type": "dashboard:register"})
        await next_of(dash, "dashboard:registered")
        await send(room, {"type": "join-room", "room": f"meter-{meter}"})
        await next_of(room, "joined")

        await publish(publisher, f"meters/{meter}/reading", {"totalPowerKw": 2.0, "voltage": 230.0})
        online = await next_of(room, "meter-status-change", within=WAIT)
        assert (online["meterId"], online["status"]) == (meter, "online")
        # both bridges may report a new device's first status; the next change is what matters
        offline = await next_of(room, "meter-status-change", lambda m: m["status"] == "offline", within=20)
        assert offline["meterId"] == meter
        # the same note carries the status change and the alert, in that order
        await next_of(dash, "device_offline", lambda m: m["deviceId"] == meter, within=WAIT)
        alert = await next_of(dash, "alert_triggered", lambda m: m["deviceId"] == meter)
        assert alert["alert_type"] == "device_offline" and alert["alert"]["kind"] == "meter"

        await publish(publisher, f"meters/{meter}/reading", {"totalPowerKw": 2.5, "voltage": 230.0})
        back = await next_of(room, "meter-status-change", lambda m: m["status"] == "online", within=WAIT)
        assert back["meterId"] == meter
        resolved = await next_of(dash, "alert_resolved", lambda m: m["deviceId"] == meter)
        assert resolved["alert_type"] == "device_offline"


async def test_vehicle_charging_at_080_raises_one_alert(
    api_server: ApiServer, publisher: Publisher, apache_url: str
) -> None:
    """A vehicle delivering 0.8 of its meter's AC: one `low_efficiency` alert pushed, resolved when DC catches up."""
    vehicle, meter = unique("v-live"), unique("m-live")
    at = stamp(timedelta(minutes=-3))
    async with api_server.client() as http, ws(api_server) as dash:
        r = await http.post("/v1/ingestion/correlate", json={"vehicleId": vehicle, "meterId": meter})
        assert r.status_code == 201, r.text
        await send(dash, {"type": "dashboard:register"})
        await next_of(dash, "dashboard:registered")
        await publish(publisher, f"meters/{meter}/reading", {"kwhConsumedAc": 20.0, "timestamp": at})
        await wait_for_rows(apache_url, "SELECT 1 FROM meter_readings WHERE meter_id = %s", (meter,), 1)
        await publish(publisher, f"vehicles/{vehicle}/reading", {"kwhDeliveredDc": 16.0, "soc": 60, "timestamp": at})
        seen = await next_of(dash, "alert_triggered", lambda m: m["deviceId"] == vehicle)
        assert (seen["alert_type"], seen["alert"]["value"]) == ("low_efficiency", 0.8)
        await publish(publisher, f"vehicles/{vehicle}/reading", {"kwhDeliveredDc": 2.0, "timestamp": stamp()})
        done = await next_of(dash, "alert_resolved", lambda m: m["deviceId"] == vehicle)
        assert done["alert"]["resolvedValue"] == 0.9
        listed = (await http.get("/api/v1/alerts", params={"deviceId": vehicle})).json()
    assert [(a["type"], a["state"], a["value"], a["resolvedValue"]) for a in listed] == [
        ("low_efficiency", "resolved", 0.8, 0.9)
    ]


async def test_rules_crud_and_their_effect(api_server: ApiServer, publisher: Publisher, apache_url: str) -> None:
    """Rules over REST: defaults listed, a device rule created (applied at once), tuned, refused when wrong, deleted."""
    pump = unique("p-crud")
    async with api_server.client() as http:
        listed = await http.get("/api/v1/alerts/rules", params={"enabled": "true", "limit": 1000})
        assert listed.status_code == 200
        builtin = {(r["type"], r["target"]): r for r in listed.json() if r["builtin"]}
        assert set(builtin) == {
            ("low_water", "ground_tank"),
            ("low_water", "roof_tank"),
            ("sensor_offline", "ground_tank"),
            ("sensor_offline", "roof_tank"),
            ("pump_protection", None),
            ("overcurrent", None),
            ("pump_overtime", None),
            ("voltage_out_of_range", None),
            ("frequency_out_of_range", None),
            ("low_efficiency", None),
            ("battery_temp_high", None),
            ("device_offline", None),
        }
        assert builtin[("low_efficiency", None)]["thresholdLow"] == 0.85
        assert int(listed.headers["X-Total-Count"]) >= 12

        bad = await http.post(
            "/api/v1/alerts/rules",
            json={"type": "low_water", "target": "attic", "thresholdLow": 30, "clearLow": 20, "severity": "panic"},
        )
        assert bad.status_code == 422
        assert {d["field"] for d in bad.json()["error"]["details"]} == {"target", "clearLow", "severity"}
        typo = await http.post("/api/v1/alerts/rules", json={"type": "low_water", "treshold": 3})
        assert typo.status_code == 422

        created = await http.post(
            "/api/v1/alerts/rules",
            json={"type": "low_water", "deviceId": pump, "target": "ground_tank", "thresholdLow": 40, "clearLow": 45},
        )
        assert created.status_code == 201, created.text
        rule = created.json()
        assert (rule["kind"], rule["severity"], rule["enabled"], rule["builtin"]) == ("pump", "warning", True, False)

        await publish(publisher, f"pumps/{pump}/status", pump_doc(ground=35.0))  # 35 %: low for this pump only
        await wait_for_rows(apache_url, "SELECT 1 FROM alerts WHERE device_id = %s", (pump,), 1)
        (alert,) = (await http.get(f"/api/v1/devices/{pump}/alerts")).json()
        assert (alert["ruleId"], alert["state"], alert["severity"]) == (rule["id"], "active", "warning")

        tuned = await http.put(
            f"/api/v1/alerts/rules/{rule['id']}", json={**rule, "thresholdLow": 30, "clearLow": 33, "severity": "high"}
        )
        assert tuned.status_code == 200, tuned.text
        assert (tuned.json()["thresholdLow"], tuned.json()["clearLow"]) == (30, 33)
        await publish(publisher, f"pumps/{pump}/status", pump_doc(ground=34.0))  # above the new clear bound
        await wait_for_rows(apache_url, "SELECT 1 FROM alerts WHERE device_id = %s AND state = 'resolved'", (pump,), 1)

        empty_band = await http.patch(f"/api/v1/alerts/rules/{rule['id']}", json={"clearLow": 20})
        assert empty_band.status_code == 422
        ground = builtin[("low_water", "ground_tank")]
        assert (await http.put(f"/api/v1/alerts/rules/{ground['id']}", json={"type": "overcurrent"})).status_code == 409
        assert (await http.delete(f"/api/v1/alerts/rules/{ground['id']}")).status_code == 409
        same = await http.put(f"/api/v1/alerts/rules/{ground['id']}", json={**ground})  # unchanged: fine
        assert same.status_code == 200 and same.json()["thresholdLow"] == ground["thresholdLow"]

        assert (await http.delete(f"/api/v1/alerts/rules/{rule['id']}")).status_code == 204
        assert (await http.get(f"/api/v1/alerts/rules/{rule['id']}")).status_code == 404
        assert (await http.delete(f"/api/v1/alerts/rules/{rule['id']}")).status_code == 404
        assert (await http.get(f"/api/v1/alerts/rules/{2**70}")).status_code == 404


async def test_alert_list_log_filters_and_ack(api_server: ApiServer, publisher: Publisher, apache_url: str) -> None:
    """Alerts and the log read back with filters and paging; ack records who and when, once."""
    pump = unique("p-list")
    topic = f"pumps/{pump}/status"
    before = datetime.now(UTC) - timedelta(seconds=1)
    await publish(publisher, topic, pump_doc(ground=5.0, amps=13.0))  # two alerts: ground low, overcurrent
    await publish(publisher, topic, pump_doc(ground=5.0, amps=3.0))  # overcurrent resolves
    await wait_for_rows(apache_url, "SELECT 1 FROM alert_events WHERE device_id = %s", (pump,), 3)
    async with api_server.client() as http:
        everything = await http.get("/api/v1/alerts", params={"deviceId": pump})
        assert everything.headers["X-Total-Count"] == "2"
        assert [(a["type"], a["active"]) for a in everything.json()] in (
            [("overcurrent", False), ("low_water", True)],
            [("low_water", True), ("overcurrent", False)],
        )
        active = (await http.get("/api/v1/alerts/active", params={"deviceId": pump})).json()
        assert [a["type"] for a in active] == ["low_water"]
        resolved = (await http.get("/api/v1/alerts", params={"deviceId": pump, "state": "resolved"})).json()
        assert [a["type"] for a in resolved] == ["overcurrent"]
        critical = (await http.get("/api/v1/alerts", params={"deviceId": pump, "severity": "critical,high"})).json()
        assert len(critical) == 2
        by_type = (await http.get("/api/v1/alerts", params={"type": "overcurrent", "deviceId": pump})).json()
        assert [a["type"] for a in by_type] == ["overcurrent"]
        window = {"deviceId": pump, "from": before.isoformat(), "to": (before + timedelta(minutes=5)).isoformat()}
        assert len((await http.get("/api/v1/alerts", params=window)).json()) == 2
        later = {"deviceId": pump, "from": (before + timedelta(minutes=5)).isoformat()}
        assert (await http.get("/api/v1/alerts", params=later)).json() == []
        page = await http.get("/api/v1/alerts", params={"deviceId": pump, "limit": 1, "offset": 1})
        assert len(page.json()) == 1 and page.headers["X-Total-Count"] == "2"
        for bad in ({"severity": "panic"}, {"active": "maybe"}, {"from": "yesterday"}, {"deviceId": "a/b"}):
            assert (await http.get("/api/v1/alerts", params=bad)).status_code == 400, bad

        low = active[0]
        one = await http.get(f"/api/v1/alerts/{low['id']}")
        assert one.json() == low and low["acknowledged"] is False
        acked = await http.post(f"/api/v1/alerts/{low['id']}/ack", json={"by": "ops"})
        assert acked.status_code == 200
        assert (acked.json()["acknowledged"], acked.json()["acknowledgedBy"]) == (True, "ops")
        again = await http.post(f"/api/v1/alerts/{low['id']}/acknowledge")
        assert again.json()["acknowledgedAt"] == acked.json()["acknowledgedAt"]
        assert (await http.post("/api/v1/alerts/999999999999/ack")).status_code == 404
        assert (await http.get("/api/v1/alerts/999999999999")).status_code == 404
        unacked = (await http.get("/api/v1/alerts", params={"deviceId": pump, "acknowledged": "false"})).json()
        assert [a["type"] for a in unacked] == ["overcurrent"]

        log = (await http.get("/api/v1/alerts/events", params={"deviceId": pump})).json()
        assert sorted((e["type"], e["event"]) for e in log) == [
            ("low_water", "acknowledged"),
            ("low_water", "raised"),
            ("overcurrent", "raised"),
            ("overcurrent", "resolved"),
        ]
        assert log[0]["event"] == "acknowledged" and log[0]["message"] == "acknowledged by ops"
        of_one = await http.get("/api/v1/alerts/events", params={"alertId": low["id"], "event": "raised"})
        assert [(e["alertId"], e["event"]) for e in of_one.json()] == [(low["id"], "raised")]


async def test_device_health_for_the_polling_view(api_server: ApiServer, publisher: Publisher, apache_url: str) -> None:
    """`device_health`: status, last report, expected interval, silence and active alerts of each device asked."""
    meter = unique("m-health")
    await publish(publisher, f"meters/{meter}/reading", {"voltage": 300.0})
    await wait_for_rows(apache_url, "SELECT 1 FROM alerts WHERE device_id = %s", (meter,), 1)
    async with await psycopg.AsyncConnection.connect(apache_url, autocommit=True) as conn:
        health = await device_health(conn, [meter, unique("nobody")], 60.0)
    assert list(health) == [meter]
    h = health[meter]
    assert (h["status"], h["expectedIntervalSeconds"], h["overdue"]) == ("online", 60.0, False)
    assert 0 <= h["secondsSinceReport"] < 30 and h["lastReport"]
    assert [(a["type"], a["severity"]) for a in h["activeAlerts"]] == [("voltage_out_of_range", "warning")]
