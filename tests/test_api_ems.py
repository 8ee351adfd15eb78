"""EMS endpoints end to end: MQTT → bridge → database → API (`/api/meters…`)."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import pytest

from bridge.config import PeakWindow
from bridge.energy import BLOCK, block_start

from .conftest import ApiServer, Publisher, room_in_block, unique, wait_for_rows

BERLIN = ZoneInfo("Europe/Berlin")  # the test site (conftest.settings_for)
PEAK = PeakWindow(time(14), time(22))
# the bridge and the server run in the session loop (fixtures); the tests must run there too
pytestmark = pytest.mark.asyncio(loop_scope="session")


def peak(start: datetime) -> bool:
    return PEAK.contains(start.astimezone(BERLIN).time())


def reading(meter_id: str, ts: datetime, **fields: Any) -> bytes:
    return orjson.dumps({"deviceId": meter_id, "timestamp": ts.isoformat(), **fields})


async def all_meters(api: ApiServer, **params: Any) -> list[dict[str, Any]]:
    """Every page of /api/meters (the session's database is shared by all tests)."""
    out: list[dict[str, Any]] = []
    async with api.client() as http:
        while True:
            r = await http.get("/api/meters", params={**params, "limit": 1000, "offset": len(out)})
            assert r.status_code == 200, r.text
            page = r.json()
            out.extend(page)
            if len(page) < 1000:
                return out


async def test_current_block_sums_interval_kwh(api_server: ApiServer, publisher: Publisher) -> None:
    """Interval kWh published into the current block add up in current-block, with its bounds and peak flag."""
    start = await room_in_block()
    meter = unique("ems")
    elapsed = datetime.now(UTC) - start
    stamps = [start + elapsed * k / 3 for k in range(3)]
    for ts, kwh in zip(stamps, (1.25, 2.5, 0.75), strict=True):
        publisher.publish(f"meters/{meter}/reading", reading(meter, ts, kwhConsumedAc=kwh, voltage=230.0))
    await wait_for_rows(
        api_server.settings.core.database_url, "SELECT 1 FROM meter_readings WHERE meter_id = %s", (meter,), 3
    )

    async with api_server.client() as http:
        r = await http.get(f"/api/meters/{meter}/current-block")
    assert r.status_code == 200, r.text
    block = r.json()
    assert block["deviceId"] == meter
    assert datetime.fromisoformat(block["start"]) == start
    assert datetime.fromisoformat(block["end"]) == start + BLOCK
    assert block["isPeakHour"] is peak(start)
    assert block["totalKwh"] == pytest.approx(4.5)
    assert block["readingCount"] == 3


async def test_block_without_data_and_unknown_meter(api_server: ApiServer, publisher: Publisher) -> None:
    """A known meter with no readings has a zero current block and no blocks today; unknown ids are 404."""
    meter, vehicle = unique("ems-quiet"), unique("ems-veh")
    publisher.publish(f"meters/{meter}/online", b"online")
    publisher.publish(f"vehicles/{vehicle}/reading", orjson.dumps({"soc": 50}))
    await wait_for_rows(
        api_server.settings.core.database_url,
        "SELECT 1 FROM devices WHERE device_id = ANY(%s)",
        ([meter, vehicle],),
        2,
    )
    async with api_server.client() as http:
        before = block_start(datetime.now(UTC))
        r = await http.get(f"/api/meters/{meter}/current-block")
        after = block_start(datetime.now(UTC))
        today = await http.get(f"/api/meters/{meter}/blocks/today")
        missing = [
            await http.get(f"/api/meters/{unique('nobody')}/current-block"),
            await http.get(f"/api/meters/{unique('nobody')}/blocks/today"),
            await http.get(f"/api/meters/{vehicle}/current-block"),  # a vehicle is not a meter
        ]
    assert r.status_code == 200, r.text
    block = r.json()
    start = datetime.fromisoformat(block["start"])
    assert start in (before, after)
    assert datetime.fromisoformat(block["end"]) == start + BLOCK
    assert block["isPeakHour"] is peak(start)
    assert (block["deviceId"], block["totalKwh"], block["readingCount"]) == (meter, 0.0, 0)
    assert today.status_code == 200 and today.json() == []
    for m in missing:
        assert m.status_code == 404, m.text
        assert m.json()["error"]["code"] == "not_found"


async def test_blocks_today(api_server: ApiServer, publisher: Publisher) -> None:
    """blocks/today lists today's blocks with data, oldest first, without yesterday's or empty carry-over blocks."""
    start = await room_in_block()
    midnight = datetime.combine(datetime.now(BERLIN).date(), time(0), tzinfo=BERLIN)
    meter = unique("ems-day")
    yesterday = midnight - timedelta(hours=2)
    earlier = start - 2 * BLOCK + timedelta(seconds=60)
    # power holds for at most 5 minutes: 6 kW → 0.5 kWh; 12 kW for 1 s, then 12 kW held 5 min (newest)
    for ts, kw in ((yesterday, 6.0), (earlier, 6.0), (start + timedelta(seconds=1), 12.0)):
        publisher.publish(f"meters/{meter}/reading", reading(meter, ts, totalPowerKw=kw))
    publisher.publish(f"meters/{meter}/reading", reading(meter, start + timedelta(seconds=2), totalPowerKw=12.0))
    await wait_for_rows(
        api_server.settings.core.database_url, "SELECT 1 FROM meter_readings WHERE meter_id = %s", (meter,), 4
    )
    expected = [(start, 12.0 * 301 / 3600, 2)]
    if earlier >= midnight:
        expected.insert(0, (block_start(earlier), 0.5, 1))

    async with api_server.client() as http:
        r = await http.get(f"/api/meters/{meter}/blocks/today")
        last = await http.get(f"/api/meters/{meter}/blocks/today", params={"limit": 1, "offset": len(expected) - 1})
    assert r.status_code == 200, r.text
    blocks = r.json()
    assert [(datetime.fromisoformat(b["start"]), b["readingCount"]) for b in blocks] == [(s, n) for s, _, n in expected]
    assert [b["totalKwh"] for b in blocks] == pytest.approx([k for _, k, _ in expected], abs=1e-5)
    for b in blocks:
        assert b["deviceId"] == meter
        assert datetime.fromisoformat(b["end"]) - datetime.fromisoformat(b["start"]) == BLOCK
        assert b["isPeakHour"] is peak(datetime.fromisoformat(b["start"]))
    assert blocks[-1]["maxKw"] == 12.0
    assert r.headers["X-Total-Count"] == str(len(expected))
    assert last.json() == [blocks[-1]]


async def test_meters_list_status_and_paging(api_server: ApiServer, publisher: Publisher) -> None:
    """/api/meters gives status, lastSeen and the latest reading, filters by status, pages, and rejects bad status."""
    on, off, vehicle = unique("ems-on"), unique("ems-off"), unique("ems-veh")
    ts = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=5)
    publisher.publish(
        f"meters/{on}/reading",
        reading(
            on,
            ts,
            totalPowerKw=7.5,
            energyTotalKwh=1234.5,
            voltage=230.1,
            current=10.2,
            frequency=50.01,
            powerFactor=0.95,
        ),
    )
    publisher.publish(f"meters/{off}/online", b"offline")
    publisher.publish(f"vehicles/{vehicle}/reading", orjson.dumps({"soc": 50}))
    await wait_for_rows(
        api_server.settings.core.database_url,
        "SELECT 1 FROM devices WHERE device_id = ANY(%s)",
        ([on, off, vehicle],),
        3,
    )

    online = {m["deviceId"]: m for m in await all_meters(api_server, status="online")}
    offline = {m["deviceId"]: m for m in await all_meters(api_server, status="offline")}
    everything = {m["deviceId"]: m for m in await all_meters(api_server)}
    assert on in online and on not in offline
    assert off in offline and off not in online
    assert {on, off} <= set(everything)
    assert all(m["status"] == "online" for m in online.values())
    assert all(m["status"] == "offline" for m in offline.values())
    assert vehicle not in everything  # a vehicle is not a meter

    mine = online[on]
    assert datetime.fromisoformat(mine["lastSeen"]) > ts - timedelta(minutes=1)
    assert mine["lastReading"] == {
        "timestamp": mine["lastReading"]["timestamp"],
        "totalPowerKw": 7.5,
        "energyTotalKwh": 1234.5,
        "kwhConsumedAc": None,
        "voltage": 230.1,
        "current": 10.2,
        "frequency": 50.01,
        "powerFactor": 0.95,
    }
    assert datetime.fromisoformat(mine["lastReading"]["timestamp"]) == ts
    assert offline[off]["lastReading"] is None

    async with api_server.client() as http:
        two = await http.get("/api/meters", params={"limit": 2})
        first = await http.get("/api/meters", params={"limit": 1})
        second = await http.get("/api/meters", params={"limit": 1, "offset": 1})
        bad = await http.get("/api/meters", params={"status": "sleeping"})
        bad_limit = await http.get("/api/meters", params={"limit": 0})
    assert int(two.headers["X-Total-Count"]) == len(everything)
    assert first.json() + second.json() == two.json()
    assert len(two.json()) == 2
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "bad_request"
    assert bad_limit.status_code == 400
