"""PUMP endpoints against the real API, bridge, broker and database."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import pytest

from .conftest import ApiServer, Publisher, query, unique, wait_for_rows
from .test_telemetry import PUMP_STATUS

# the api_server fixture runs uvicorn on the session loop: the tests must run there too
pytestmark = pytest.mark.asyncio(loop_scope="session")
BERLIN = ZoneInfo("Europe/Berlin")


def status_doc(
    device_id: str,
    ts: datetime | None = None,
    *,
    ground: float | None = 45.2,
    roof: float | None = 78.9,
    running: bool = True,
    amps: float | None = 5.2,
    sensor_working: bool = True,
    connected: bool = True,
) -> dict[str, Any]:
    """The PUMP example status, for `device_id`, with the fields tests vary."""
    doc = copy.deepcopy(PUMP_STATUS)
    doc["device_id"] = device_id
    doc["timestamp"] = int((ts or datetime.now(UTC)).timestamp() * 1000)
    doc["ground_tank"].update(level_percent=ground, sensor_working=sensor_working, connected=connected)
    doc["roof_tank"]["level_percent"] = roof
    doc["pump"].update(running=running, current_amps=amps)
    return doc


def db(api_server: ApiServer) -> str:
    return api_server.settings.core.database_url


async def publish_status(api_server: ApiServer, publisher: Publisher, doc: dict[str, Any]) -> None:
    """Publish a status as the device would and wait until the bridge stored it."""
    device_id = doc["device_id"]
    ts = datetime.fromtimestamp(doc["timestamp"] / 1000, UTC)
    publisher.publish(f"pumps/{device_id}/status", orjson.dumps(doc))
    await wait_for_rows(
        db(api_server), "SELECT 1 FROM pump_status WHERE device_id = %s AND ts = %s", (device_id, ts), 1
    )


async def test_status_update_over_http_lands_and_reads_back(api_server: ApiServer) -> None:
    """POST status/update goes through MQTT and the bridge, then reads back whole on both status endpoints."""
    pump = unique("pump")
    doc = status_doc(pump)
    async with api_server.client() as http:
        r = await http.post("/api/v1/devices/status/update", json=doc)
        assert r.status_code == 202, r.text
        assert r.json()["deviceId"] == pump and r.json()["topic"] == f"pumps/{pump}/status"
        await wait_for_rows(db(api_server), "SELECT 1 FROM pump_latest WHERE device_id = %s", (pump,), 1)

        one = (await http.get(f"/api/v1/devices/{pump}/status")).json()
        assert one["device_id"] == pump
        assert one["ground_tank"] == doc["ground_tank"]
        assert one["roof_tank"] == doc["roof_tank"]
        assert one["pump"]["running"] is True and one["pump"]["current_amps"] == 5.2
        assert one["system"] == doc["system"]
        assert datetime.fromisoformat(one["timestamp"]) == datetime.fromtimestamp(doc["timestamp"] / 1000, UTC)
        assert one["online"] is True
        assert datetime.fromisoformat(one["last_seen"]).tzinfo is not None

        r = await http.get("/api/v1/devices/status", params={"limit": 1000})
        assert r.status_code == 200
        assert int(r.headers["X-Total-Count"]) >= 1
        listed = {s["device_id"]: s for s in r.json()}
        assert listed[pump] == one

        # the default history is the last 24 hours by the hour: this one status is in it
        (bucket,) = (await http.get(f"/api/v1/devices/{pump}/history")).json()
        assert bucket["samples"] == 1
        assert bucket["ground_tank"]["avg_level_percent"] == 45.2
        assert bucket["pump"] == {"running_ratio": 1.0, "avg_current_amps": 5.2, "max_current_amps": 5.2}


async def test_status_list_pages(api_server: ApiServer, publisher: Publisher) -> None:
    """limit/offset page the pump list in device-id order."""
    prefix = unique("pg")
    pumps = [f"{prefix}-{i}" for i in range(3)]
    for p in pumps:
        await publish_status(api_server, publisher, status_doc(p))
    async with api_server.client() as http:
        everything = [s["device_id"] for s in (await http.get("/api/v1/devices/status?limit=1000")).json()]
        assert everything == sorted(everything)
        start = everything.index(pumps[0])
        page = (await http.get("/api/v1/devices/status", params={"limit": 2, "offset": start + 1})).json()
        assert [s["device_id"] for s in page] == everything[start + 1 : start + 3]
        assert (await http.get("/api/v1/devices/status?limit=0")).status_code == 400


async def test_pump_event_over_http_is_stored(api_server: ApiServer) -> None:
    """POST events/pump is published and the bridge stores the event with its extra fields."""
    pump = unique("pump")
    async with api_server.client() as http:
        r = await http.post(
            "/api/v1/devices/events/pump", json={"device_id": pump, "event": "pump_started", "reason": "manual"}
        )
        assert r.status_code == 202, r.text
    (row,) = await wait_for_rows(
        db(api_server), "SELECT event, payload FROM pump_events WHERE device_id = %s", (pump,), 1
    )
    assert row[0] == "pump_started" and row[1]["reason"] == "manual"


async def test_ingestion_rejects_invalid_bodies(api_server: ApiServer) -> None:
    """Missing device_id, a broken tank and a missing event name are 422 with field details; bad JSON is 400."""
    pump = unique("pump")
    async with api_server.client() as http:
        no_id = status_doc(pump)
        del no_id["device_id"]
        r = await http.post("/api/v1/devices/status/update", json=no_id)
        assert r.status_code == 422 and r.json()["error"]["code"] == "validation_error"

        broken = status_doc(pump, ground=140.0)
        r = await http.post("/api/v1/devices/status/update", json=broken)
        assert r.status_code == 422
        assert any(d["field"] == "ground_tank.level_percent" for d in r.json()["error"]["details"])

        r = await http.post("/api/v1/devices/events/pump", json={"device_id": pump})
        assert r.status_code == 422

        r = await http.post(
            "/api/v1/devices/status/update", content=b"{nope", headers={"Content-Type": "application/json"}
        )
        assert r.status_code == 400
    assert query(db(api_server), "SELECT 1 FROM devices WHERE device_id = %s", (pump,)) == []


async def test_unknown_pump_is_404(api_server: ApiServer) -> None:
    """Status and history of a device never seen are 404."""
    async with api_server.client() as http:
        for path in ("status", "history"):
            r = await http.get(f"/api/v1/devices/{unique('ghost')}/{path}")
            assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def history_base() -> datetime:
    """An even UTC hour two days ago, 12:00 or 13:00 in Berlin: both test hours lie in one local day."""
    day = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=2)
    return day + timedelta(hours=10)


async def test_history_buckets(api_server: ApiServer, publisher: Publisher) -> None:
    """Averages, extremes, running ratio and sample counts per bucket for 15m, 30m, 1h, 2h and 1d."""
    pump = unique("hist")
    h0 = history_base()
    h1 = h0 + timedelta(hours=1)
    samples = [
        (h0, 40.0, 70.0, True, 4.0),
        (h0 + timedelta(minutes=10), 50.0, 80.0, False, 0.0),
        (h0 + timedelta(minutes=20), 60.0, 90.0, True, 6.0),
        (h1 + timedelta(minutes=5), 20.0, 60.0, False, 0.0),
        (h1 + timedelta(minutes=35), 30.0, 50.0, False, 0.0),
    ]
    for ts, ground, roof, running, amps in samples:
        publisher.publish(
            f"pumps/{pump}/status",
            orjson.dumps(status_doc(pump, ts, ground=ground, roof=roof, running=running, amps=amps)),
        )
    await wait_for_rows(db(api_server), "SELECT 1 FROM pump_status WHERE device_id = %s", (pump,), len(samples))

    async def hist(interval: str, start: datetime, end: datetime) -> list[dict[str, Any]]:
        r = await http.get(
            f"/api/v1/devices/{pump}/history",
            params={"from": start.isoformat(), "to": end.isoformat(), "interval": interval},
        )
        assert r.status_code == 200, r.text
        return r.json()

    async with api_server.client() as http:
        hourly = await hist("1h", h0, h0 + timedelta(hours=2))
        assert [datetime.fromisoformat(b["timestamp"]) for b in hourly] == [h0, h1]
        first, second = hourly
        assert first["samples"] == 3 and second["samples"] == 2
        assert first["ground_tank"] == {"avg_level_percent": 50.0, "min_level_percent": 40.0, "max_level_percent": 60.0}
        assert first["roof_tank"] == {"avg_level_percent": 80.0, "min_level_percent": 70.0, "max_level_percent": 90.0}
        assert first["pump"] == {"running_ratio": 0.6667, "avg_current_amps": 3.333, "max_current_amps": 6.0}
        assert second["ground_tank"]["avg_level_percent"] == 25.0
        assert second["pump"]["running_ratio"] == 0.0

        (two,) = await hist("2h", h0, h0 + timedelta(hours=2))
        assert datetime.fromisoformat(two["timestamp"]) == h0
        assert two["samples"] == 5
        assert two["ground_tank"] == {"avg_level_percent": 40.0, "min_level_percent": 20.0, "max_level_percent": 60.0}
        assert two["pump"]["running_ratio"] == 0.4 and two["pump"]["avg_current_amps"] == 2.0

        quarter = await hist("15m", h0, h1)
        assert [(datetime.fromisoformat(b["timestamp"]), b["samples"]) for b in quarter] == [
            (h0, 2),
            (h0 + timedelta(minutes=15), 1),
        ]
        assert quarter[0]["ground_tank"]["avg_level_percent"] == 45.0

        half = await hist("30m", h0, h0 + timedelta(hours=2))
        assert [(datetime.fromisoformat(b["timestamp"]), b["samples"]) for b in half] == [
            (h0, 3),
            (h1, 1),
            (h1 + timedelta(minutes=30), 1),
        ]

        (day,) = await hist("1d", h0 - timedelta(hours=10), h0 + timedelta(hours=12))
        start = datetime.fromisoformat(day["timestamp"]).astimezone(BERLIN)
        assert (start.hour, start.minute, start.date()) == (0, 0, h0.astimezone(BERLIN).date())
        assert day["samples"] == 5

        # a range that misses the data has no buckets
        assert await hist("1h", h0 + timedelta(hours=3), h0 + timedelta(hours=5)) == []


@pytest.mark.parametrize(
    "params",
    [
        {"interval": "abc"},
        {"interval": "0m"},
        {"interval": "5s"},
        {"from": "yesterday"},
        {"from": "2030-01-02T00:00:00+00:00", "to": "2030-01-01T00:00:00+00:00"},
        {"interval": "1m", "from": "2020-01-01T00:00:00+00:00"},
    ],
)
async def test_history_rejects_bad_parameters(
    api_server: ApiServer, publisher: Publisher, params: dict[str, str]
) -> None:
    """Bad intervals, unreadable or inverted times and too many buckets are 400."""
    pump = unique("hbad")
    await publish_status(api_server, publisher, status_doc(pump))
    async with api_server.client() as http:
        r = await http.get(f"/api/v1/devices/{pump}/history", params=params)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "bad_request"


async def test_system_stats_move(api_server: ApiServer, publisher: Publisher) -> None:
    """devices, messages received/stored and dead letters grow as messages arrive."""
    async with api_server.client() as http:
        before = (await http.get("/api/v1/devices/system/stats")).json()
        assert set(before) == {
            "devices",
            "onlineDevices",
            "messagesReceived",
            "messagesStored",
            "deadLetters",
            "websocketClients",
        }
        pump = unique("stats")
        await publish_status(api_server, publisher, status_doc(pump))
        publisher.publish(f"pumps/{pump}/status", b"{not json")
        await wait_for_rows(db(api_server), "SELECT 1 FROM dead_letters WHERE device_id = %s", (pump,), 1)
        after = (await http.get("/api/v1/devices/system/stats")).json()
    assert after["devices"] >= before["devices"] + 1
    assert after["onlineDevices"] >= 1
    assert after["messagesReceived"] >= before["messagesReceived"] + 2
    assert after["messagesStored"] >= before["messagesStored"] + 1
    assert after["deadLetters"] >= before["deadLetters"] + 1
    assert isinstance(after["websocketClients"], int) and after["websocketClients"] >= 0
