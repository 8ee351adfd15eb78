"""`firmware-sim sample`: deterministic data, loaded through broker and bridge, and a second load changes nothing."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections import defaultdict
from datetime import date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from firmware_sim.model import Outbound, charger_id, meter_id, pump_id, vehicle_id
from firmware_sim.sample import (
    FAULTY_VEHICLE,
    METERS,
    PUMPS,
    VEHICLES,
    Spec,
    Window,
    current_block_start,
    messages,
    midnight,
    window,
)

from bridge.schema import COUNTER_TOTAL

from .conftest import API_TOKEN, ROOT, ApiServer, query, unique

TZ = ZoneInfo("Europe/Berlin")  # the zone the shared test databases are migrated for
HOURS = 3


def stamp(m: Outbound) -> float:
    return float(m.payload["timestamp"]) / 1000.0


def energy(msgs: list[Outbound], start: float, end: float) -> tuple[dict[str, float], dict[str, float]]:
    """DC kWh per vehicle and AC kWh per charger meter reported within (start, end]."""
    dc: dict[str, float] = defaultdict(float)
    ac: dict[str, float] = defaultdict(float)
    for m in msgs:
        if start < stamp(m) <= end:
            if m.kind == "vehicle":
                dc[m.device_id] += m.payload["kwhDeliveredDc"]
            elif m.device_id.endswith("-charger"):
                ac[m.device_id] += m.payload["kwhConsumedAc"]
    return dc, ac


def test_sample_messages_are_the_same_on_every_run() -> None:
    """A window gives the same messages every time, and a shorter window's messages are among a longer one's."""
    spec = Spec(prefix="det", tz=TZ)
    day = date(2025, 3, 30)  # the spring DST change in Berlin: a 23-hour day
    whole = Window(midnight(day, TZ), midnight(day + timedelta(days=1), TZ))
    first, again = list(messages(spec, whole)), list(messages(spec, whole))
    assert first == again
    per_device = len(spec.device_ids())
    reports = [m for m in first if m.channel in ("reading", "status")]
    assert len(reports) == 23 * 60 * per_device  # every device, every 60 s of the 23 hours
    assert min(map(stamp, reports)) == whole.start + 60 and max(map(stamp, reports)) == whole.end
    assert any(m.channel == "event" for m in first), "no pump event in a whole day"

    def comparable(m: Outbound) -> tuple[str, int, dict[str, Any]]:
        # only the register may be left out of a window's first reading
        return m.topic, m.payload["timestamp"], {k: v for k, v in m.payload.items() if k != "energyTotalKwh"}

    part = Window(whole.start + 5 * 3600, whole.start + 8 * 3600)
    inside = [comparable(m) for m in messages(spec, part)]
    expected = [comparable(m) for m in first if part.start < stamp(m) <= part.end]
    assert inside == expected and len(inside) == 3 * 60 * per_device + sum(m[0].endswith("/event") for m in inside)

    # a whole day: the faulty EV's charger wastes ~20 %, the other's ~10 %
    dc, ac = energy(first, whole.start, whole.end)
    for i in range(1, VEHICLES + 1):
        vid = vehicle_id("det", i)
        ratio = dc[vid] / ac[charger_id(vid)]
        assert (ratio < 0.85) == (i == FAULTY_VEHICLE), (vid, ratio)


def test_default_window_is_yesterday_and_today_until_the_current_block() -> None:
    """Without options the window runs from 00:00 yesterday to the start of the block in progress."""
    now = datetime(2025, 6, 12, 15, 47, 10, tzinfo=TZ).timestamp()
    w = window(TZ, now)
    assert datetime.fromtimestamp(w.start, TZ) == datetime(2025, 6, 11, 0, 0, tzinfo=TZ)
    assert datetime.fromtimestamp(w.end, TZ) == datetime(2025, 6, 12, 15, 30, tzinfo=TZ)
    day = window(TZ, now, day=date(2025, 6, 10))
    assert (day.start, day.end) == (midnight(date(2025, 6, 10), TZ), midnight(date(2025, 6, 11), TZ))
    assert window(TZ, now, hours=3).start == w.end - 3 * 3600
    with pytest.raises(ValueError, match="future"):
        window(TZ, now, day=date(2025, 6, 13))


def pick_window(spec: Spec, now: float) -> tuple[Window, list[Outbound]]:
    """A recent HOURS-long window (inside the 24-hour efficiency view) in which both EVs charge."""
    end0 = current_block_start(now)
    ends = [end0 - j * 1800 for j in range(40) if end0 - j * 1800 - HOURS * 3600 >= now - 22 * 3600]
    everything = list(messages(spec, Window(ends[-1] - HOURS * 3600, end0)))
    for end in ends:
        dc, ac = energy(everything, end - HOURS * 3600, end)
        if len(dc) == VEHICLES and min(dc.values()) > 1.0 and min(ac.values()) > 1.0:
            win = Window(end - HOURS * 3600, end)
            return win, [m for m in everything if win.start < stamp(m) <= win.end]
    raise AssertionError("no recent window in which both EVs charge: the sample lost its charging sessions")


async def load(api_server: ApiServer, mqtt_url: str, prefix: str, end: float) -> subprocess.CompletedProcess[str]:
    """Run `firmware-sim sample` as an operator would (in a thread: the API serves from this event loop)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("API_", "MQTT_", "ENV_FILE"))}
    env.update({"MQTT_URL": mqtt_url, "SITE_TIMEZONE": "Europe/Berlin", "PYTHONPATH": str(ROOT)})
    end_iso = datetime.fromtimestamp(end, TZ).isoformat()
    args = ["sample", "--prefix", prefix, "--hours", str(HOURS), "--end", end_iso]
    args += ["--api", api_server.base_url, "--token", API_TOKEN]
    proc = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "firmware_sim", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


SNAPSHOT = {
    "meter_readings": "SELECT meter_id, ts, power_kw, kwh_consumed_ac, energy_total_kwh FROM meter_readings "
    "WHERE meter_id LIKE %(p)s ORDER BY 1, 2",
    "vehicle_readings": "SELECT vehicle_id, ts, soc, kwh_delivered_dc FROM vehicle_readings "
    "WHERE vehicle_id LIKE %(p)s ORDER BY 1, 2",
    "pump_status": "SELECT device_id, ts, ground_level_percent, roof_level_percent, pump_running FROM pump_status "
    "WHERE device_id LIKE %(p)s ORDER BY 1, 2",
    "pump_events": "SELECT device_id, ts, event FROM pump_events WHERE device_id LIKE %(p)s ORDER BY 1, 2, 3",
    "meter_energy": "SELECT meter_id, source_ts, ts, round(kwh::numeric, 9) FROM meter_energy "
    "WHERE meter_id LIKE %(p)s ORDER BY 1, 2, 3",
    "energy_per_meter": "SELECT meter_id, round(sum(kwh)::numeric, 6), count(*) FROM meter_energy "
    "WHERE meter_id LIKE %(p)s GROUP BY 1 ORDER BY 1",
    "meter_blocks_30m": "SELECT meter_id, block_start, total_kwh, reading_count, round(avg_kw::numeric, 6), max_kw "
    "FROM meter_blocks_30m WHERE meter_id LIKE %(p)s ORDER BY 1, 2",
    "vehicle_efficiency_24h": "SELECT vehicle_id, kwh_ac, kwh_dc, efficiency_ratio, record_count "
    "FROM vehicle_efficiency_24h WHERE vehicle_id LIKE %(p)s ORDER BY 1",
    "correlations": "SELECT vehicle_id, meter_id FROM meter_vehicle_correlations WHERE vehicle_id LIKE %(p)s "
    "ORDER BY 1",
}


async def snapshot(url: str, prefix: str) -> dict[str, list[tuple[Any, ...]]]:
    params = {"p": f"{prefix}-%"}
    return {name: await asyncio.to_thread(query, url, sql, params) for name, sql in SNAPSHOT.items()}


async def stored_all(url: str, prefix: str, msgs: list[Outbound], within: float = 60.0) -> None:
    """Wait until the bridge has stored a row for every message of the window."""
    expected = {
        "meter_readings": sum(m.kind == "meter" for m in msgs),
        "vehicle_readings": sum(m.kind == "vehicle" for m in msgs),
        "pump_status": sum(m.channel == "status" for m in msgs),
        "pump_events": sum(m.channel == "event" for m in msgs),
    }
    deadline = time.monotonic() + within
    while True:
        got = {name: len(rows) for name, rows in (await snapshot(url, prefix)).items() if name in expected}
        if got == expected or time.monotonic() > deadline:
            assert got == expected
            return
        await asyncio.sleep(0.2)


def rounded(value: Any) -> Any:
    """Floats to 9 places: a repeat recomputes a block's pieces, and avg(kW) may then sum in another order."""
    if isinstance(value, float):
        return round(value, 9)
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v) for v in value]
    return value


async def received(url: str) -> int:
    rows = await asyncio.to_thread(query, url, COUNTER_TOTAL, ("messages_received",))
    return int(rows[0][0])


# the bridge and the server run in the session loop (fixtures); the test must run there too
@pytest.mark.asyncio(loop_scope="session")
async def test_sample_loaded_twice_changes_nothing(api_server: ApiServer, apache_url: str, mqtt_url: str) -> None:
    """Loading one sample window twice stores the same rows, pieces, blocks and efficiency, and the endpoints answer."""
    prefix = unique("smp")
    spec = Spec(prefix=prefix, tz=TZ)
    win, msgs = pick_window(spec, time.time())

    first = await load(api_server, mqtt_url, prefix, win.end)
    assert f"sample: {len(msgs)} messages" in first.stdout, first.stdout
    assert first.stdout.count("(201 created)") == VEHICLES, first.stdout
    await stored_all(apache_url, prefix, msgs)
    before = await snapshot(apache_url, prefix)
    assert len(before["meter_blocks_30m"]) >= (METERS + VEHICLES) * HOURS * 2
    assert len(before["vehicle_efficiency_24h"]) == VEHICLES

    async def answers() -> dict[str, Any]:
        async with api_server.client() as http:
            meters = (await http.get("/api/meters", params={"limit": 1000})).json()
            blocks = await http.get(f"/api/meters/{meter_id(prefix, 1)}/blocks/today")
            performance = {
                vehicle_id(prefix, i): (await http.get(f"/v1/analytics/performance/{vehicle_id(prefix, i)}")).json()
                for i in range(1, VEHICLES + 1)
            }
            pumps = [(await http.get(f"/api/v1/devices/{pump_id(prefix, i)}/status")) for i in range(1, PUMPS + 1)]
        assert blocks.status_code == 200 and all(p.status_code == 200 for p in pumps)
        ours = [m for m in meters if m["deviceId"].startswith(f"{prefix}-")]
        for p in performance.values():
            p.pop("periodStart"), p.pop("periodEnd")  # the view's window moves with the clock
        return {
            "meters": sorted((m["deviceId"], m["lastReading"]["timestamp"]) for m in ours),
            "blocks": rounded(blocks.json()),
            "performance": rounded(performance),
            "pumps": [p.json()["timestamp"] for p in pumps],
        }

    seen = await answers()
    last = datetime.fromtimestamp(win.end, TZ)
    assert len(seen["meters"]) == METERS + VEHICLES
    assert all(datetime.fromisoformat(ts) == last for _, ts in seen["meters"])
    assert all(datetime.fromisoformat(ts) == last for ts in seen["pumps"])
    assert seen["blocks"], "no block of today for the sample meter"
    today = midnight(datetime.now(TZ).date(), TZ)
    assert all(datetime.fromisoformat(b["start"]).timestamp() >= today for b in seen["blocks"])
    dc, ac = energy(msgs, win.start, win.end)
    for i in range(1, VEHICLES + 1):
        vid = vehicle_id(prefix, i)
        perf = seen["performance"][vid]
        assert perf["recordCount"] == HOURS * 60
        assert perf["totalKwhDeliveredDc"] == pytest.approx(dc[vid], abs=1e-3)
        assert perf["totalKwhConsumedAc"] == pytest.approx(ac[charger_id(vid)], abs=1e-3)
        faulty = i == FAULTY_VEHICLE
        assert (perf["efficiencyRatio"] < 0.85) == faulty, perf
        assert perf["status"] == ("fault_suspected" if faulty else "normal")

    count = await received(apache_url)
    second = await load(api_server, mqtt_url, prefix, win.end)
    assert f"sample: {len(msgs)} messages" in second.stdout, second.stdout
    assert second.stdout.count("(200 already known)") == VEHICLES, second.stdout
    deadline = time.monotonic() + 60
    while await received(apache_url) < count + len(msgs):  # every repeat has reached the bridge
        assert time.monotonic() < deadline, "the bridge did not receive the second load"
        await asyncio.sleep(0.2)
    assert await snapshot(apache_url, prefix) == before
    assert await answers() == seen
