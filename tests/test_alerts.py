"""Alerts: the rules' verdicts (pure), and the bridge raising and resolving them from published data."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from bridge.alerts import (
    Active,
    AlertEngine,
    Quiet,
    Rule,
    Snapshot,
    _Staged,
    applicable,
    obis_observations,
    observations,
    pump_observations,
    rule_problems,
    step,
    with_device_max,
)
from bridge.config import MqttUrl
from bridge.telemetry import Message, MeterReading, ObisReading, PumpStatus, PumpStatusIn, Stored

from .conftest import Publisher, query, settings_for, unique, wait_for_rows

WAIT = 15.0
_last_stamp = [datetime.now(UTC)]


def stamp(offset: timedelta = timedelta()) -> str:
    """A strictly increasing time near now (two messages of a device never share one)."""
    ts = max(datetime.now(UTC), _last_stamp[0] + timedelta(milliseconds=1))
    _last_stamp[0] = ts
    return (ts + offset).isoformat()


def pump_doc(
    ground: float = 60.0,
    roof: float = 70.0,
    *,
    running: bool = False,
    amps: float = 3.0,
    runtime: float = 0.0,
    protection: bool = False,
    ground_connected: bool = True,
    roof_working: bool = True,
    timestamp: str | None = None,
) -> dict[str, Any]:
    return {
        "timestamp": timestamp or stamp(),
        "ground_tank": {"level_percent": ground, "connected": ground_connected, "sensor_working": True},
        "roof_tank": {"level_percent": roof, "connected": True, "sensor_working": roof_working},
        "pump": {
            "running": running,
            "current_amps": amps,
            "runtime_minutes": runtime,
            "protection_active": protection,
            "overcurrent_protection": False,
            "overtime_protection": False,
        },
    }


async def publish(publisher: Publisher, topic: str, payload: Any, retain: bool = False) -> None:
    data = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    await asyncio.to_thread(publisher.publish, topic, data, 1, retain)


async def stored(url: str, table: str, column: str, device: str, n: int) -> None:
    """Wait until the device has `n` rows in `table` (its alerts commit with them)."""
    await wait_for_rows(url, f"SELECT 1 FROM {table} WHERE {column} = %s", (device,), n, within=WAIT)  # noqa: S608


def notify_rules(url: str) -> None:
    """What the API does on each rule change: the bridge reloads its rules and device maxima."""
    query(url, "SELECT 1 FROM pg_notify('alert_rules', '')")


def alerts_of(url: str, device: str) -> list[tuple[Any, ...]]:
    return query(
        url,
        "SELECT a.type, r.target, a.state, a.value, a.resolved_value, a.severity FROM alerts a "
        "JOIN alert_rules r ON r.id = a.rule_id WHERE a.device_id = %s ORDER BY a.id",
        (device,),
    )


def events_of(url: str, device: str) -> list[tuple[Any, ...]]:
    return query(url, "SELECT type, event FROM alert_events WHERE device_id = %s ORDER BY ts, id", (device,))


async def wait_alerts(url: str, device: str, where: str, n: int, within: float = WAIT) -> None:
    await wait_for_rows(url, f"SELECT 1 FROM alerts WHERE device_id = %s AND {where}", (device,), n, within)  # noqa: S608


class AlertListener:
    """An MQTT client subscribed to `alerts/{device}`, collecting what the bridge publishes there."""

    def __init__(self, url: str, device: str) -> None:
        u = MqttUrl.parse(url)
        self.messages: list[dict[str, Any]] = []
        self._subscribed = threading.Event()
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=unique("sub"))
        self.client.on_message = lambda c, u, m: self.messages.append(orjson.loads(m.payload))
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.connect(u.host, u.port)
        self.client.loop_start()
        self.client.subscribe(f"alerts/{device}", qos=1)
        assert self._subscribed.wait(10), "no SUBACK"

    async def wait(self, mine: Any, n: int) -> list[dict[str, Any]]:
        """The messages `mine` accepts, once there are `n` (and a moment more, for any doubled one)."""
        deadline = time.monotonic() + WAIT
        while sum(1 for m in self.messages if mine(m)) < n and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)  # paho's thread appends; nothing to await on
        await asyncio.sleep(0.3)
        return [m for m in self.messages if mine(m)]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# ---- pure -----------------------------------------------------------------------------------


def test_band_rule_hysteresis() -> None:
    """A band rule raises past a threshold and resolves only inside the clear band; values between change nothing."""
    low_water = Rule(1, "low_water", kind="pump", target="ground_tank", low=15.0, clear_low=20.0)
    states = []
    active = False
    for level in (30.0, 14.9, 16.0, 14.0, 19.99, 15.0, 20.0, 17.0, 14.0):
        active = step(active, low_water, (level,))
        states.append(active)
    assert states == [False, True, True, True, True, True, False, False, True]
    volts = Rule(2, "voltage_out_of_range", low=207.0, high=253.0, clear_low=212.0, clear_high=248.0)
    assert step(False, volts, (230.0, 230.0, 206.0))  # one phase out is enough
    assert step(True, volts, (230.0, 250.0, 231.0))  # one phase not yet back keeps it
    assert not step(True, volts, (230.0, 247.0, 231.0))
    assert volts.worst((230.0, 260.0, 200.0)) == 260.0
    flag = Rule(3, "pump_protection")
    assert step(False, flag, True) and not step(True, flag, False)


def test_rule_precedence_and_device_maximum() -> None:
    """A device's rule replaces its kind's of the same type and target; disabled, it silences them."""
    kind_ground = Rule(1, "low_water", kind="pump", target="ground_tank", low=15.0)
    kind_roof = Rule(2, "low_water", kind="pump", target="roof_tank", low=20.0)
    everyone = Rule(3, "device_offline")
    mine = Rule(4, "low_water", device_id="p1", kind="pump", target="ground_tank", low=40.0)
    off = Rule(5, "low_water", device_id="p2", target="ground_tank", low=40.0, enabled=False)
    meter_rule = Rule(6, "voltage_out_of_range", kind="meter", low=1.0)
    rules = [kind_ground, kind_roof, everyone, mine, off, meter_rule]
    assert {r.id for r in applicable(rules, "p1", "pump")} == {2, 3, 4}
    assert {r.id for r in applicable(rules, "p2", "pump")} == {2, 3}
    assert {r.id for r in applicable(rules, "p3", "pump")} == {1, 2, 3}
    assert {r.id for r in applicable(rules, "m1", "meter")} == {3, 6}
    over = Rule(7, "overcurrent", kind="pump", high=10.0, clear_high=9.0)
    assert with_device_max(over, 6.0) == replace(over, high=6.0, clear_high=5.0)
    assert with_device_max(replace(over, device_id="p1"), 6.0).high == 10.0  # the device's own rule wins
    assert with_device_max(over, None) is over


def _judge(engine: AlertEngine, snap: Snapshot, batch: list[MeterReading], quiet: bool) -> list[tuple[Any, ...]]:
    """One batch through the engine's planning, the database's part (raise, resolve) played by hand."""
    staged = _Staged(snap)
    engine._staged = staged
    now = datetime.now(UTC)
    items = [Message("meter", r.meter_id, now, [r]) for r in batch]
    hush = Quiet(snap, staged.active_devices()) if quiet else None
    episodes = engine._plan(staged, observations(items, Stored(all_meters=True, meters=batch), hush), now, hush)
    for e in episodes:
        staged.active[(e.device_id, e.rule.id)] = None if e.resolved is not None else Active(1, e.kind)
    engine.commit()
    found = [(e.device_id, e.rule.id, e.raised and e.raised.ts, e.resolved_at, e.message, e.note) for e in episodes]
    return sorted(found, key=repr)


def test_quiet_readings_change_no_verdict() -> None:
    """Leaving in-band meter readings out of the rule runs raises, resolves and judges exactly as running them all."""
    rules = [
        Rule(1, "voltage_out_of_range", kind="meter", low=207.0, high=253.0, clear_low=212.0, clear_high=248.0),
        Rule(2, "frequency_out_of_range", kind="meter", low=49.5, high=50.5, clear_low=49.8, clear_high=50.2),
        Rule(3, "voltage_out_of_range", device_id="m2", kind="meter", low=100.0, high=120.0),
        Rule(4, "device_offline"),
    ]
    volts = [230.0, 230.0, 230.0, 250.0, 255.0, 205.0, 210.0, 110.0, None]
    hertz = [50.0, 50.0, 50.0, 50.3, 50.6, 49.4, None]
    start = datetime(2026, 1, 1, tzinfo=UTC)
    raised = 0
    for seed in range(40):
        rng = random.Random(seed)
        readings = [
            MeterReading(
                f"m{rng.randrange(4)}",
                start + timedelta(seconds=i),
                1.0,
                None,
                None,
                rng.choice(volts),
                None,
                rng.choice(hertz),
                None,
            )
            for i in range(300)
        ]
        late = readings[100:200]
        rng.shuffle(late)  # late data among the rest
        readings[100:200] = late
        full, fast = AlertEngine(), AlertEngine()
        snaps = (Snapshot(list(rules)), Snapshot(list(rules)))
        while readings:
            n = rng.randrange(1, 40)
            batch, readings = readings[:n], readings[n:]
            expected = _judge(full, snaps[0], batch, quiet=False)
            assert _judge(fast, snaps[1], batch, quiet=True) == expected, seed
            raised += len(expected)
        assert fast._seen == full._seen
        assert snaps[1].active == snaps[0].active
    assert raised > 100  # the readings do cross the bands


def test_rule_problems_name_each_field() -> None:
    """Rule validation names every bad field; a valid rule has none."""
    assert rule_problems({"type": "low_water", "target": "ground_tank", "thresholdLow": 10, "severity": "high"}) == []
    assert rule_problems({"type": "device_offline", "severity": "warning"}) == []
    fields = {
        p["field"]
        for p in rule_problems(
            {
                "type": "low_water",
                "kind": "meter",
                "target": "cellar",
                "thresholdLow": 30,
                "clearLow": 20,
                "severity": "panic",
                "deviceId": "a/b",
            }
        )
    }
    assert fields == {"kind", "target", "clearLow", "severity", "deviceId"}
    assert [p["field"] for p in rule_problems({"type": "pump_protection", "thresholdHigh": 1, "severity": "low"})] == [
        "thresholdHigh"
    ]
    assert [p["field"] for p in rule_problems({"type": "nope"})] == ["type"]
    assert [p["field"] for p in rule_problems({"type": "voltage_out_of_range", "severity": "low"})] == ["thresholdLow"]


def test_observations_skip_levels_of_broken_sensors() -> None:
    """A tank whose sensor is off reports a sensor fault, and its level is not judged as low water."""
    doc = pump_doc(ground=3.0, ground_connected=False, running=True, runtime=12.0)
    rec = PumpStatus("p1", datetime.now(UTC), PumpStatusIn.model_validate(doc))
    seen = {(o.type, o.target): o.value for o in pump_observations(rec)}
    assert seen[("sensor_offline", "ground_tank")] is True
    assert ("low_water", "ground_tank") not in seen
    assert seen[("low_water", "roof_tank")] == (70.0,)
    assert seen[("pump_overtime", None)] == (12.0,)
    assert seen[("pump_protection", None)] is False
    ts = datetime.now(UTC)
    obis = [
        ObisReading("m1", ts, code, value, value, 0, None, None)
        for code, value in (("1-0:32.7.0.255", 231.0), ("1-0:52.7.0", 190.0), ("1-0:1.8.0.255", 5.0))
    ]
    (volts,) = obis_observations(obis)
    assert (volts.type, volts.value) == ("voltage_out_of_range", (231.0, 190.0))


# ---- end to end -----------------------------------------------------------------------------

# (case, device kind, topic channel, bad payload, good payload, alert type, target, raised value, resolved value)
CASES = [
    ("ground low", "pump", "status", pump_doc(ground=10.0), pump_doc(ground=30.0), "low_water", "ground_tank", 10, 30),
    ("roof low", "pump", "status", pump_doc(roof=12.5), pump_doc(roof=40.0), "low_water", "roof_tank", 12.5, 40),
    (
        "ground sensor",
        "pump",
        "status",
        pump_doc(ground_connected=False),
        pump_doc(),
        "sensor_offline",
        "ground_tank",
        None,
        None,
    ),
    (
        "roof sensor",
        "pump",
        "status",
        pump_doc(roof_working=False),
        pump_doc(),
        "sensor_offline",
        "roof_tank",
        None,
        None,
    ),
    ("protection", "pump", "status", pump_doc(protection=True), pump_doc(), "pump_protection", None, None, None),
    ("overcurrent", "pump", "status", pump_doc(amps=12.0), pump_doc(amps=4.0), "overcurrent", None, 12, 4),
    (
        "overtime",
        "pump",
        "status",
        pump_doc(running=True, runtime=75.0),
        pump_doc(running=False),
        "pump_overtime",
        None,
        75,
        0,
    ),
    ("voltage", "meter", "reading", {"voltage": 190.0}, {"voltage": 231.0}, "voltage_out_of_range", None, 190, 231),
    (
        "frequency",
        "meter",
        "reading",
        {"frequency": 51.2},
        {"frequency": 50.0},
        "frequency_out_of_range",
        None,
        51.2,
        50,
    ),
    (
        "obis voltage",
        "meter",
        "obis",
        {"1-0:32.7.0.255": 230.0, "1-0:52.7.0.255": 260.0, "1-0:72.7.0.255": 231.0},
        {"1-0:32.7.0.255": 230.0, "1-0:52.7.0.255": 231.0, "1-0:72.7.0.255": 229.0},
        "voltage_out_of_range",
        None,
        260,
        231,
    ),
    ("battery", "vehicle", "reading", {"batteryTemp": 61.0}, {"batteryTemp": 30.0}, "battery_temp_high", None, 61, 30),
]
TABLES = {
    "status": ("pump_status", "device_id"),
    "reading": ("meter_readings", "meter_id"),
    "obis": ("obis_readings", "meter_id"),
}
PREFIX = {"pump": "pumps", "meter": "meters", "vehicle": "vehicles"}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
async def test_default_rule_raised_and_resolved(
    case: tuple[Any, ...], apache_url: str, mqtt_url: str, start_bridge, publisher: Publisher
) -> None:
    """Each default rule: a bad reading raises exactly one alert, a good one resolves it, both logged."""
    _, kind, channel, bad, good, type_, target, raised, resolved = case
    await start_bridge(settings_for(apache_url, mqtt_url))
    device = unique(f"{kind[0]}-al")
    topic = f"{PREFIX[kind]}/{device}/{channel}"
    table, column = TABLES[channel] if kind != "vehicle" else ("vehicle_readings", "vehicle_id")
    rows = 1 if channel != "obis" else 3

    await publish(publisher, topic, {**good, "timestamp": stamp()})  # normal first: nothing to say
    await stored(apache_url, table, column, device, rows)
    assert alerts_of(apache_url, device) == []
    await publish(publisher, topic, {**bad, "timestamp": stamp()})
    await stored(apache_url, table, column, device, 2 * rows)
    await publish(publisher, topic, {**bad, "timestamp": stamp()})  # still bad: still the one alert
    await stored(apache_url, table, column, device, 3 * rows)
    (alert,) = alerts_of(apache_url, device)
    assert alert[:4] == (type_, target, "active", raised)
    await publish(publisher, topic, {**good, "timestamp": stamp()})
    await wait_alerts(apache_url, device, "state = 'resolved'", 1)
    (alert,) = alerts_of(apache_url, device)
    assert alert[:5] == (type_, target, "resolved", raised, resolved)
    assert events_of(apache_url, device) == [(type_, "raised"), (type_, "resolved")]


async def test_alerts_are_published_on_their_topic(
    apache_url: str, mqtt_url: str, start_bridge, publisher: Publisher
) -> None:
    """A pump running dry: `alerts/{deviceId}` gets the raise and then the resolve, each once."""
    await start_bridge(settings_for(apache_url, mqtt_url))
    pump = unique("p-dry")
    listener = AlertListener(mqtt_url, pump)
    try:
        await publish(publisher, f"pumps/{pump}/status", pump_doc(ground=8.0, running=True, runtime=5.0))
        await publish(publisher, f"pumps/{pump}/status", pump_doc(ground=60.0))
        await wait_alerts(apache_url, pump, "state = 'resolved'", 1)
        ((alert_id,),) = query(apache_url, "SELECT id FROM alerts WHERE device_id = %s", (pump,))
        # other test sessions' bridges on this broker may publish their own alert for the same device:
        # ours are those with our database's alert id
        ours = await listener.wait(lambda m: m["id"] == alert_id, 2)
    finally:
        listener.close()
    assert [(m["event"], m["type"], m["state"]) for m in ours] == [
        ("raised", "low_water", "active"),
        ("resolved", "low_water", "resolved"),
    ]
    raised, resolved = ours
    assert raised["deviceId"] == pump and raised["kind"] == "pump" and raised["severity"] == "critical"
    assert raised["value"] == 8.0 and "below 15 %" in raised["message"]
    assert resolved["resolvedValue"] == 60.0


@pytest.mark.parametrize("rapid", [False, True], ids=["batch-by-batch", "one-burst"])
async def test_hysteresis_at_the_threshold(
    rapid: bool, apache_url: str, mqtt_url: str, start_bridge, publisher: Publisher
) -> None:
    """Levels wandering between 15 % (raise) and 20 % (clear) make one alert; a second only after a clear."""
    await start_bridge(settings_for(apache_url, mqtt_url))
    pump = unique("p-hys")
    levels = [30.0, 14.0, 16.0, 14.5, 19.9, 15.0, 14.9, 19.99, 20.0, 17.0, 16.0, 14.0, 18.0]
    for i, level in enumerate(levels, 1):
        await publish(publisher, f"pumps/{pump}/status", pump_doc(ground=level))
        if not rapid:
            await stored(apache_url, "pump_status", "device_id", pump, i)
    await stored(apache_url, "pump_status", "device_id", pump, len(levels))
    ground = [a for a in alerts_of(apache_url, pump) if a[1] == "ground_tank"]
    assert [a[2:5] for a in ground] == [("resolved", 14.0, 20.0), ("active", 14.0, None)]
    assert [e for e in events_of(apache_url, pump) if e[0] == "low_water"] == [
        ("low_water", "raised"),
        ("low_water", "resolved"),
        ("low_water", "raised"),
    ]


async def test_late_and_repeated_data_change_nothing(
    apache_url: str, mqtt_url: str, start_bridge, publisher: Publisher
) -> None:
    """A reading older than one already judged, or the same reading again, neither raises nor resolves."""
    await start_bridge(settings_for(apache_url, mqtt_url))
    meter = unique("m-late")
    topic = f"meters/{meter}/reading"
    old, first = stamp(timedelta(seconds=-30)), stamp(timedelta(seconds=-20))
    await publish(publisher, topic, {"voltage": 180.0, "timestamp": first})
    await publish(publisher, topic, {"voltage": 230.0, "timestamp": stamp(timedelta(seconds=-10))})
    await stored(apache_url, "meter_readings", "meter_id", meter, 2)
    await publish(publisher, topic, {"voltage": 150.0, "timestamp": old})  # late history
    await publish(publisher, topic, {"voltage": 180.0, "timestamp": first})  # a repeat
    await publish(publisher, topic, {"voltage": 229.0})  # a marker: everything before it is done
    await stored(apache_url, "meter_readings", "meter_id", meter, 4)
    assert [a[2:5] for a in alerts_of(apache_url, meter)] == [("resolved", 180.0, 230.0)]


async def test_offline_by_will_raises_and_return_resolves(
    apache_url: str, mqtt_url: str, start_bridge, publisher: Publisher
) -> None:
    """A retained `offline` will raises `device_offline`; the device's next message resolves it."""
    await start_bridge(settings_for(apache_url, mqtt_url))
    pump = unique("p-will")
    await publish(publisher, f"pumps/{pump}/status", pump_doc())
    await stored(apache_url, "pump_status", "device_id", pump, 1)
    try:
        await publish(publisher, f"pumps/{pump}/online", b"offline", retain=True)
        await wait_alerts(apache_url, pump, "type = 'device_offline' AND state = 'active'", 1)
        await publish(publisher, f"pumps/{pump}/online", b"online", retain=True)
        await wait_alerts(apache_url, pump, "type = 'device_offline' AND state = 'resolved'", 1)
    finally:
        await publish(publisher, f"pumps/{pump}/online", b"", retain=True)  # clear the retained will
    assert [a[:3] for a in alerts_of(apache_url, pump)] == [("device_offline", None, "resolved")]
    assert query(apache_url, "SELECT kind FROM alerts WHERE device_id = %s", (pump,)) == [("pump",)]


async def test_offline_by_silence_raises_and_return_resolves(
    apache_url: str, mqtt_url: str, start_bridge, publisher: Publisher
) -> None:
    """Silence past `offline_after` raises `device_offline` (from the sweep); a new reading resolves it."""
    await start_bridge(replace(settings_for(apache_url, mqtt_url), offline_after=1.0))
    meter = unique("m-quiet")
    await publish(publisher, f"meters/{meter}/reading", {"voltage": 230.0})
    await wait_alerts(apache_url, meter, "type = 'device_offline' AND state = 'active'", 1, within=20)
    assert query(apache_url, "SELECT status FROM devices WHERE device_id = %s", (meter,)) == [("offline",)]
    await publish(publisher, f"meters/{meter}/reading", {"voltage": 231.0})
    await wait_alerts(apache_url, meter, "type = 'device_offline' AND state = 'resolved'", 1)
    assert events_of(apache_url, meter)[:2] == [("device_offline", "raised"), ("device_offline", "resolved")]


async def test_restart_during_an_active_alert_neither_loses_nor_doubles(
    apache_url: str, mqtt_url: str, start_bridge, publisher: Publisher
) -> None:
    """Bridge stopped with an alert active, data meanwhile, another started: one alert, raised and resolved once;
    the raising message redelivered after yet another restart raises nothing."""
    settings = settings_for(apache_url, mqtt_url)
    first = await start_bridge(settings)
    pump = unique("p-restart")
    topic = f"pumps/{pump}/status"
    dry = pump_doc(ground=9.0)
    await publish(publisher, topic, dry)
    await wait_alerts(apache_url, pump, "state = 'active'", 1)
    await first.close()

    await publish(publisher, topic, pump_doc(ground=11.0))  # still low, held by the broker meanwhile
    second = await start_bridge(settings)  # same client id: the session and its queued messages resume
    await stored(apache_url, "pump_status", "device_id", pump, 2)
    assert [a[2] for a in alerts_of(apache_url, pump)] == ["active"]
    await publish(publisher, topic, pump_doc(ground=50.0))
    await wait_alerts(apache_url, pump, "state = 'resolved'", 1)
    await second.close()

    await start_bridge(settings)  # a fresh engine: nothing judged yet in memory
    await publish(publisher, topic, dry)  # the raising message again (a redelivery): stored once, judged once
    await publish(publisher, topic, pump_doc(ground=55.0))
    await stored(apache_url, "pump_status", "device_id", pump, 4)
    assert [a[:5] for a in alerts_of(apache_url, pump)] == [("low_water", "ground_tank", "resolved", 9.0, 50.0)]
    assert events_of(apache_url, pump) == [("low_water", "raised"), ("low_water", "resolved")]


async def test_low_efficiency_from_the_24h_sums(
    apache_url: str, mqtt_url: str, start_bridge, publisher: Publisher
) -> None:
    """A vehicle charging at 0.8 of its meter's AC raises `low_efficiency` (the view's ratio); 0.9 resolves it,
    though the meter's writer raised it and the vehicle's writer resolves it (BRIDGE_WRITERS=2)."""
    vehicle, meter = unique("v-eff"), unique("m-eff")
    while hash(vehicle) % 2 == hash(meter) % 2:  # the bridge runs in this process: the same hash splits devices
        meter = unique("m-eff")
    query(
        apache_url,
        "INSERT INTO meter_vehicle_correlations (vehicle_id, meter_id) VALUES (%s, %s) RETURNING 1",
        (vehicle, meter),
    )
    await start_bridge(settings_for(apache_url, mqtt_url))
    at = stamp(timedelta(minutes=-5))
    await publish(publisher, f"vehicles/{vehicle}/reading", {"kwhDeliveredDc": 8.0, "soc": 50, "timestamp": at})
    await stored(apache_url, "vehicle_readings", "vehicle_id", vehicle, 1)
    assert alerts_of(apache_url, vehicle) == []  # no AC yet: nothing to judge
    await publish(publisher, f"meters/{meter}/reading", {"kwhConsumedAc": 10.0, "timestamp": at})
    await wait_alerts(apache_url, vehicle, "state = 'active'", 1)
    (alert,) = alerts_of(apache_url, vehicle)
    view = query(apache_url, "SELECT efficiency_ratio FROM vehicle_efficiency_24h WHERE vehicle_id = %s", (vehicle,))
    assert alert[:4] == ("low_efficiency", None, "active", 0.8) and view == [(0.8,)]
    await publish(publisher, f"vehicles/{vehicle}/reading", {"kwhDeliveredDc": 1.0, "timestamp": stamp()})
    await wait_alerts(apache_url, vehicle, "state = 'resolved'", 1)
    assert [a[:5] for a in alerts_of(apache_url, vehicle)] == [("low_efficiency", None, "resolved", 0.8, 0.9)]


async def test_device_maximum_current_from_its_meta(
    apache_url: str, mqtt_url: str, start_bridge, publisher: Publisher
) -> None:
    """Overcurrent uses the device's `pump_max_current` (meta) over the default 10 A, once rules reload."""
    await start_bridge(settings_for(apache_url, mqtt_url))
    small, default = unique("p-small"), unique("p-big")
    for pump in (small, default):
        await publish(publisher, f"pumps/{pump}/status", pump_doc(amps=3.0))
        await stored(apache_url, "pump_status", "device_id", pump, 1)
    query(
        apache_url,
        "UPDATE devices SET meta = '{\"pump_max_current\": 6}' WHERE device_id = %s RETURNING device_id",
        (small,),
    )
    notify_rules(apache_url)
    for pump in (small, default):
        await publish(publisher, f"pumps/{pump}/status", pump_doc(amps=7.5))
        await stored(apache_url, "pump_status", "device_id", pump, 2)
    assert [a[:4] for a in alerts_of(apache_url, small)] == [("overcurrent", None, "active", 7.5)]
    assert alerts_of(apache_url, default) == []
    await publish(publisher, f"pumps/{small}/status", pump_doc(amps=5.5))  # under 6 A, not yet 1 A under
    await stored(apache_url, "pump_status", "device_id", small, 3)
    assert [a[2] for a in alerts_of(apache_url, small)] == ["active"]
    await publish(publisher, f"pumps/{small}/status", pump_doc(amps=5.0))
    await wait_alerts(apache_url, small, "state = 'resolved'", 1)


async def test_device_rule_applies_at_once_and_its_removal_resolves(
    apache_url: str, mqtt_url: str, start_bridge, publisher: Publisher
) -> None:
    """A device rule (NOTIFY) overrides the default at once; deleting it resolves its active alert by itself."""
    await start_bridge(settings_for(apache_url, mqtt_url))
    pump = unique("p-rule")
    await publish(publisher, f"pumps/{pump}/status", pump_doc(ground=35.0))
    await stored(apache_url, "pump_status", "device_id", pump, 1)
    ((rule_id,),) = query(
        apache_url,
        "INSERT INTO alert_rules (type, device_id, kind, target, threshold_low, clear_low, severity) "
        "VALUES ('low_water', %s, 'pump', 'ground_tank', 40, 45, 'low') RETURNING id",
        (pump,),
    )
    notify_rules(apache_url)
    await publish(publisher, f"pumps/{pump}/status", pump_doc(ground=35.0))
    await wait_alerts(apache_url, pump, "state = 'active'", 1)
    assert query(apache_url, "SELECT rule_id, severity FROM alerts WHERE device_id = %s", (pump,)) == [(rule_id, "low")]
    query(apache_url, "DELETE FROM alert_rules WHERE id = %s RETURNING id", (rule_id,))
    notify_rules(apache_url)
    await wait_alerts(apache_url, pump, "state = 'resolved'", 1)  # no data needed: the sweep does it
    ((note,),) = query(
        apache_url, "SELECT message FROM alert_events WHERE device_id = %s AND event = 'resolved'", (pump,)
    )
    assert "rule removed" in note


async def test_shared_subscription_bridges_keep_one_alert_state(
    apache_url: str, mqtt_url: str, start_bridge, publisher: Publisher
) -> None:
    """Two bridges on one shared subscription take turns: each raise is resolved, whichever bridge saw it."""
    group = unique("grp").replace("-", "")
    base = replace(settings_for(apache_url, mqtt_url), shared_group=group)
    for _ in range(2):
        await start_bridge(replace(base, client_id=unique("bridge")))
    pump = unique("p-shared")
    levels = [60.0, 10.0, 50.0, 10.0, 50.0, 10.0, 50.0]
    for i, level in enumerate(levels, 1):
        await publish(publisher, f"pumps/{pump}/status", pump_doc(ground=level))
        await stored(apache_url, "pump_status", "device_id", pump, i)
    ground = [a[2:5] for a in alerts_of(apache_url, pump) if a[1] == "ground_tank"]
    assert ground == [("resolved", 10.0, 50.0)] * 3


async def test_shared_writers_resolve_what_the_other_raised_on_a_quiet_reading(apache_url: str) -> None:
    """On a shared subscription, a meter's in-band reading resolves the alert another bridge raised."""
    from bridge.db import Database
    from bridge.writer import Writer

    from .test_aggregates import messages

    meter, other = unique("m-shared-quiet"), unique("m-shared-quiet")
    start = datetime.now(UTC) - timedelta(minutes=5)
    volts = [190.0, 231.0, 190.0, 231.0]
    async with Database(apache_url) as a, Database(apache_url) as b:
        writers = [Writer(db, shared=True, alerts=AlertEngine(shared=True)) for db in (a, b)]
        for i in range(4):  # each engine's first two batches load every active alert: past those, it trusts its cache
            ts = (start - timedelta(seconds=10 - i)).isoformat()
            await writers[i % 2].write(messages([(f"meters/{other}/reading", {"voltage": 230.0, "timestamp": ts})]))
        for i, v in enumerate(volts):  # alternating, as the broker hands a shared subscription's messages out
            ts = (start + timedelta(seconds=i)).isoformat()
            await writers[i % 2].write(messages([(f"meters/{meter}/reading", {"voltage": v, "timestamp": ts})]))
    rows = [a[2:5] for a in alerts_of(apache_url, meter) if a[0] == "voltage_out_of_range"]
    assert rows == [("resolved", 190.0, 231.0)] * 2
