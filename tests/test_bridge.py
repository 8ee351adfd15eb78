"""The bridge end to end: Mosquitto → bridge → PostgreSQL 15 with Apache TimescaleDB."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import orjson
import pytest

from .conftest import ROOT, Publisher, query, settings_for, unique, wait_for_rows
from .test_telemetry import PUMP_STATUS

BERLIN = ZoneInfo("Europe/Berlin")


def local(*args: int) -> datetime:
    return datetime(*args, tzinfo=BERLIN)  # type: ignore[misc]


def iso(ts: datetime) -> str:
    return ts.isoformat()


async def test_every_device_family_lands(apache_url: str, mqtt_url: str, start_bridge, publisher: Publisher) -> None:
    """Meter (EMS and EIE names), OBIS (both forms), vehicle, nested pump status and pump events become rows."""
    await start_bridge(settings_for(apache_url, mqtt_url))
    m1, m2, v1, p1 = unique("m"), unique("m"), unique("v"), unique("p")
    publisher.publish(f"meters/{m1}/reading", orjson.dumps({"deviceId": m1, "totalPowerKw": 12.5, "frequency": 50.0}))
    publisher.publish(f"meters/{m2}/reading", orjson.dumps({"meterId": m2, "kwhConsumedAc": 1.5, "voltage": 231.0}))
    publisher.publish(
        f"meters/{m1}/obis",
        orjson.dumps(
            {"readings": [{"obisCode": "1-0:1.8.0.255", "value": 12345, "unit": "Wh", "scaler": -3, "quality": "good"}]}
        ),
    )
    publisher.publish(f"meters/{m2}/obis", orjson.dumps({"1-0:1.8.0.255": 777, "1-0:2.8.0.255": 3}))
    publisher.publish(
        f"vehicles/{v1}/reading", orjson.dumps({"vehicleId": v1, "soc": 40, "kwhDeliveredDc": 2.0, "batteryTemp": 30.5})
    )
    publisher.publish(f"pumps/{p1}/status", orjson.dumps({**PUMP_STATUS, "device_id": p1}))
    publisher.publish(f"pumps/{p1}/event", orjson.dumps({"event": "pump_started", "reason": "auto"}))

    rows = await wait_for_rows(
        apache_url,
        "SELECT meter_id, power_kw, kwh_consumed_ac, voltage, frequency "
        "FROM meter_readings WHERE meter_id = ANY(%s) ORDER BY meter_id",
        ([m1, m2],),
        2,
    )
    assert {r[0]: r[1:] for r in rows} == {m1: (12.5, None, None, 50.0), m2: (None, 1.5, 231.0, None)}
    obis = await wait_for_rows(
        apache_url,
        "SELECT meter_id, obis_code, value, unit FROM obis_readings WHERE meter_id = ANY(%s)",
        ([m1, m2],),
        3,
    )
    assert sorted((r[0], r[1], round(r[2], 3), r[3]) for r in obis) == sorted(
        [(m1, "1-0:1.8.0.255", 12.345, "Wh"), (m2, "1-0:1.8.0.255", 777.0, None), (m2, "1-0:2.8.0.255", 3.0, None)]
    )
    (veh,) = await wait_for_rows(
        apache_url, "SELECT soc, kwh_delivered_dc, battery_temp FROM vehicle_readings WHERE vehicle_id = %s", (v1,), 1
    )
    assert veh == (40.0, 2.0, 30.5)
    (pump,) = await wait_for_rows(
        apache_url,
        "SELECT ground_level_percent, roof_level_percent, pump_running, "
        "pump_current_amps, auto_mode_enabled, ts FROM pump_status WHERE device_id = %s",
        (p1,),
        1,
    )
    assert pump == (45.2, 78.9, True, 5.2, True, datetime.fromtimestamp(1763650800, UTC))
    await wait_for_rows(
        apache_url, "SELECT 1 FROM pump_events WHERE device_id = %s AND event = 'pump_started'", (p1,), 1
    )
    latest = query(apache_url, "SELECT status->'pump'->>'current_amps' FROM pump_latest WHERE device_id = %s", (p1,))
    assert latest == [("5.2",)]
    kinds = query(
        apache_url, "SELECT device_id, kind, status FROM devices WHERE device_id = ANY(%s)", ([m1, m2, v1, p1],)
    )
    assert sorted(kinds) == sorted(
        [(m1, "meter", "online"), (m2, "meter", "online"), (v1, "vehicle", "online"), (p1, "pump", "online")]
    )


async def test_known_answer_25kwh_and_peak_flag(
    apache_url: str, mqtt_url: str, start_bridge, publisher: Publisher
) -> None:
    """50 kW every 60 s for the 14:00 Berlin block gives 25.0 kWh, 30 readings, a peak block."""
    await start_bridge(settings_for(apache_url, mqtt_url))
    meter = unique("m")
    start = local(2026, 11, 20, 14, 0)
    for minute in range(30):
        publisher.publish(
            f"meters/{meter}/reading",
            orjson.dumps({"totalPowerKw": 50, "timestamp": iso(start + timedelta(minutes=minute))}),
        )
    await wait_for_rows(apache_url, "SELECT 1 FROM meter_readings WHERE meter_id = %s", (meter,), 30)
    rows = query(
        apache_url,
        "SELECT total_kwh, reading_count, avg_kw, max_kw, is_peak FROM meter_blocks_30m "
        "WHERE meter_id = %s AND block_start = %s",
        (meter, start),
    )
    assert rows == [(25.0, 30, 50.0, 50.0, True)]


@pytest.mark.parametrize(
    ("when", "peak"),
    [((13, 30), False), ((14, 0), True), ((21, 30), True), ((22, 0), False)],
)
async def test_peak_flag_at_window_edges(
    apache_url: str, mqtt_url: str, start_bridge, publisher: Publisher, when: tuple[int, int], peak: bool
) -> None:
    """Blocks starting 13:30/14:00/21:30/22:00 local (Berlin, summer and winter) are peak per 14:00-22:00."""
    await start_bridge(settings_for(apache_url, mqtt_url))
    meter = unique("m")
    starts = [local(2026, 1, 5, *when), local(2026, 7, 1, *when)]
    for ts in starts:
        publisher.publish(f"meters/{meter}/reading", orjson.dumps({"totalPowerKw": 10, "timestamp": iso(ts)}))
    await wait_for_rows(apache_url, "SELECT 1 FROM meter_readings WHERE meter_id = %s", (meter,), 2)
    rows = query(
        apache_url,
        "SELECT block_start, is_peak FROM meter_blocks_30m WHERE meter_id = %s "
        "AND reading_count > 0 ORDER BY block_start",
        (meter,),
    )
    assert rows == [(ts.astimezone(UTC), peak) for ts in starts]


async def test_bad_input_is_dead_lettered_and_good_lands(
    apache_url: str, mqtt_url: str, start_bridge, publisher: Publisher
) -> None:
    """Each kind of bad message goes to dead_letters with its reason; the good ones around it are stored."""
    await start_bridge(settings_for(apache_url, mqtt_url))
    meter = unique("m")
    base = local(2026, 11, 21, 9, 0)
    bad = {
        f"meters/{meter}/reading": [
            b"{not json",
            orjson.dumps({"totalPowerKw": "fifty"}),
            orjson.dumps({"powerFactor": 3}),
            orjson.dumps({"voltage": 1, "meterId": "other"}),
            orjson.dumps({"voltage": 1, "pad": "x" * 70000}),
        ],
        f"meters/{meter}/unknown": [orjson.dumps({"voltage": 1})],
    }
    sent_bad = 0
    for i in range(3):
        publisher.publish(
            f"meters/{meter}/reading", orjson.dumps({"voltage": 230 + i, "timestamp": iso(base + timedelta(minutes=i))})
        )
        for topic, payloads in bad.items():
            if i < len(payloads):
                publisher.publish(topic, payloads[i])
                sent_bad += 1
    for topic, payloads in bad.items():
        for payload in payloads[3:]:
            publisher.publish(topic, payload)
            sent_bad += 1
    good = await wait_for_rows(
        apache_url, "SELECT voltage FROM meter_readings WHERE meter_id = %s ORDER BY ts", (meter,), 3
    )
    assert [g[0] for g in good] == [230.0, 231.0, 232.0]
    letters = await wait_for_rows(
        apache_url,
        "SELECT topic, reason, length(payload) FROM dead_letters WHERE topic LIKE %s",
        (f"meters/{meter}/%",),
        sent_bad,
    )
    reasons = " | ".join(r[1] for r in letters)
    for expected in ("not valid JSON", "totalPowerKw", "powerFactor", "differs", "exceeds", "unknown topic"):
        assert expected in reasons
    assert max(r[2] for r in letters) > 70000  # stored whole


async def test_repeated_message_is_stored_once(
    apache_url: str, mqtt_url: str, start_bridge, publisher: Publisher
) -> None:
    """The same reading delivered twice (same device, timestamp, kind) is one row and counts its kWh once."""
    await start_bridge(settings_for(apache_url, mqtt_url))
    meter = unique("m")
    ts = local(2026, 11, 22, 10, 0)
    payload = orjson.dumps({"kwhConsumedAc": 2.0, "timestamp": iso(ts)})
    publisher.publish(f"meters/{meter}/reading", payload)
    await wait_for_rows(apache_url, "SELECT 1 FROM meter_readings WHERE meter_id = %s", (meter,), 1)
    publisher.publish(f"meters/{meter}/reading", payload)
    publisher.publish(
        f"meters/{meter}/reading", orjson.dumps({"voltage": 1.0, "timestamp": iso(ts + timedelta(minutes=1))})
    )
    await wait_for_rows(apache_url, "SELECT 1 FROM meter_readings WHERE meter_id = %s", (meter,), 2)
    assert query(apache_url, "SELECT count(*) FROM meter_readings WHERE meter_id = %s AND ts = %s", (meter, ts)) == [
        (1,)
    ]
    assert query(
        apache_url, "SELECT total_kwh FROM meter_blocks_30m WHERE meter_id = %s AND block_start = %s", (meter, ts)
    ) == [(2.0,)]


async def test_presence_and_silence_set_devices_offline(
    apache_url: str, mqtt_url: str, start_bridge, publisher: Publisher
) -> None:
    """A retained `offline` will marks a device offline; silence past the timeout does too."""
    from dataclasses import replace as dc_replace

    settings = dc_replace(settings_for(apache_url, mqtt_url), offline_after=1.0)
    await start_bridge(settings)
    willing, silent = unique("p"), unique("m")
    publisher.publish(f"meters/{silent}/reading", orjson.dumps({"voltage": 230}))
    publisher.publish(f"pumps/{willing}/online", b"online")
    await wait_for_rows(apache_url, "SELECT 1 FROM devices WHERE device_id = %s AND status = 'online'", (willing,), 1)
    publisher.publish(f"pumps/{willing}/online", b"offline", retain=True)
    await wait_for_rows(apache_url, "SELECT 1 FROM devices WHERE device_id = %s AND status = 'offline'", (willing,), 1)
    await wait_for_rows(
        apache_url, "SELECT 1 FROM devices WHERE device_id = %s AND status = 'offline'", (silent,), 1, within=20
    )
    publisher.publish(f"pumps/{willing}/online", b"", retain=True)  # clear the retained will


def _bridge_process(db_url: str, mqtt_url: str, client_id: str) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "DATABASE_URL": db_url,
        "MQTT_URL": mqtt_url,
        "BRIDGE_CLIENT_ID": client_id,
        "SITE_TIMEZONE": "Europe/Berlin",
        "BRIDGE_BATCH_SIZE": "200",
        "BRIDGE_HEALTH": "127.0.0.1:0",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "bridge"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


async def test_bridge_killed_mid_stream_loses_nothing(apache_url: str, mqtt_url: str) -> None:
    """SIGKILL the bridge while devices publish at QoS 1; after a restart every message is stored exactly once."""
    client_id = unique("bridge")
    meters = [unique("m") for _ in range(4)]
    per_meter = 500
    start = local(2026, 11, 23, 0, 0)
    proc = _bridge_process(apache_url, mqtt_url, client_id)
    try:
        await asyncio.sleep(1.5)  # let it connect and subscribe, so its persistent session exists

        def publish_all() -> None:
            pub = Publisher(mqtt_url)
            try:
                infos = []
                for i in range(per_meter):
                    ts = iso(start + timedelta(seconds=10 * i))
                    for m in meters:
                        payload = orjson.dumps({"totalPowerKw": 6.0, "timestamp": ts})
                        infos.append(pub.client.publish(f"meters/{m}/reading", payload, qos=1))
                    if i % 50 == 0:
                        pub.publish(f"meters/{meters[0]}/online", b"online")  # pace and confirm
                for info in infos:
                    info.wait_for_publish(30)
            finally:
                pub.close()

        publisher = threading.Thread(target=publish_all)
        publisher.start()
        await wait_for_rows(
            apache_url, "SELECT 1 FROM meter_readings WHERE meter_id = ANY(%s) LIMIT 200", (meters,), 200, within=30
        )
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        await asyncio.to_thread(publisher.join, 60)
        proc = _bridge_process(apache_url, mqtt_url, client_id)
        total = len(meters) * per_meter
        await wait_for_rows(
            apache_url, "SELECT 1 FROM meter_readings WHERE meter_id = ANY(%s)", (meters,), total, within=60
        )
        await asyncio.sleep(0.5)
        assert query(
            apache_url,
            "SELECT count(*), count(DISTINCT (meter_id, ts)) FROM meter_readings WHERE meter_id = ANY(%s)",
            (meters,),
        ) == [(total, total)]
        # 6 kW held 10 s per reading: every meter's energy is counted once, the newest reading's hold 5 min
        energy = query(
            apache_url,
            "SELECT meter_id, sum(total_kwh) FROM meter_blocks_30m WHERE meter_id = ANY(%s) GROUP BY meter_id",
            (meters,),
        )
        expected = 6.0 * ((per_meter - 1) * 10 + 300) / 3600
        assert sorted(round(e[1], 4) for e in energy) == [round(expected, 4)] * len(meters)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


async def test_partitioned_bridges_store_each_device_once(
    apache_url: str, mqtt_url: str, start_bridge, publisher: Publisher
) -> None:
    """BRIDGE_PARTITION 0/2 and 1/2: every message stored once, each bridge its own devices, in order."""
    from bridge.mqtt import owner

    group = unique("part")
    bridges = [
        await start_bridge(settings_for(apache_url, mqtt_url, partition=(i, 2), client_id=f"{group}-{i}of2"))
        for i in range(2)
    ]
    meters = [unique("m") for _ in range(12)]
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=30)
    for minute in range(5):
        for m in meters:
            body = {"totalPowerKw": 6.0, "timestamp": iso(start + timedelta(minutes=minute))}
            publisher.publish(f"meters/{m}/reading", orjson.dumps(body))
    publisher.publish(f"meters/{meters[0]}/reading", b"not json")
    rows = await wait_for_rows(
        apache_url, "SELECT meter_id, ts FROM meter_readings WHERE meter_id = ANY(%s)", (meters,), 5 * len(meters)
    )
    assert sorted(rows) == sorted((m, start + timedelta(minutes=i)) for m in meters for i in range(5))
    # the held power of each reading ends at the next one: 4 minutes at 6 kW, plus the newest's 5 provisional
    energy = await wait_for_rows(
        apache_url,
        "SELECT meter_id, round(sum(kwh)::numeric, 6) FROM meter_energy WHERE meter_id = ANY(%s) GROUP BY 1",
        (meters,),
        len(meters),
    )
    assert {float(kwh) for _, kwh in energy} == {0.9}
    letters = await wait_for_rows(apache_url, "SELECT 1 FROM dead_letters WHERE device_id = %s", (meters[0],), 1)
    assert len(letters) == 1
    mine = [sum(owner(f"meters/{m}/reading".encode(), 2) == i for m in meters) for i in range(2)]
    assert all(mine), "the test's meters should fall on both partitions"
    for i, rb in enumerate(bridges):
        stored = rb.bridge.metrics.stored._value.get()
        assert stored == 5 * mine[i], (i, stored, mine)
