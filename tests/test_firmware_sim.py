"""firmware-sim: the pure device models (no services), then the simulation on the real broker."""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from typing import Any

import orjson
import paho.mqtt.client as mqtt
import pytest
from firmware_sim import SimConfig, Simulation
from firmware_sim.model import (
    CommandError,
    Fleet,
    FleetSpec,
    MeterModel,
    Outbound,
    PumpModel,
    PumpSpec,
    SimClock,
    default_history,
    local_hour,
)
from paho.mqtt.enums import CallbackAPIVersion

from bridge.config import MqttUrl
from bridge.telemetry import Decoder, Message

from .conftest import ROOT, unique

T0 = 1763596800.0  # 2025-11-20 00:00 UTC
STEP = 300.0


def run_fleet(fleet: Fleet, ticks: int, step: float = STEP) -> list[Outbound]:
    out: list[Outbound] = []
    for k in range(1, ticks + 1):
        out += fleet.tick(T0 + k * step)
    return out


def of(messages: list[Outbound], device_id: str, channel: str) -> list[dict[str, Any]]:
    return [m.payload for m in messages if m.device_id == device_id and m.channel == channel]


def scripted_run(seed: int) -> list[tuple[str, bytes]]:
    fleet = Fleet(FleetSpec(meters=2, vehicles=2, pumps=2, seed=seed, faulty=0.5), T0)
    out = run_fleet(fleet, 60)
    out += fleet.command("meter", "sim-meter-001", {"commandId": "a", "command": "read_obis"}, T0 + 60 * STEP + 7)
    out += fleet.command(
        "pump", "sim-pump-002", {"commandId": "b", "command": "pump", "state": "off"}, T0 + 60 * STEP + 9
    )
    out += fleet.tick(T0 + 61 * STEP)
    return [(m.topic, orjson.dumps(m.payload)) for m in out]


def test_same_seed_same_data() -> None:
    """Two fleets with one seed publish byte-identical messages; another seed publishes different ones."""
    first, again, other = scripted_run(42), scripted_run(42), scripted_run(43)
    assert len(first) > 400
    assert first == again
    assert first != other


def test_every_model_message_decodes() -> None:
    """A simulated day of every device family decodes with the bridge's decoder, no dead letter."""
    fleet = Fleet(FleetSpec(meters=2, vehicles=2, pumps=2, seed=9), T0)
    out = run_fleet(fleet, 288)
    out += fleet.command("meter", "sim-ev-001-charger", {"commandId": "o", "command": "read_obis"}, fleet.t)
    decoder = Decoder(UTC)
    received = datetime.fromtimestamp(fleet.t, UTC)
    channels = set()
    for m in out:
        decoded = decoder.decode(m.topic, orjson.dumps(m.payload), received)
        assert isinstance(decoded, Message), (m.topic, m.payload, decoded)
        channels.add((m.kind, m.channel))
    assert channels >= {
        ("meter", "reading"),
        ("meter", "obis"),
        ("meter", "cmd/result"),
        ("vehicle", "reading"),
        ("pump", "status"),
        ("pump", "event"),
    }


def test_pump_moves_water_from_ground_to_roof() -> None:
    """Auto mode starts the pump on a low roof tank: roof rises, ground falls by what was pumped, ~5 A drawn."""
    pump = PumpModel("p", random.Random(1), T0, ground_percent=80, roof_percent=20, supply_on=False)
    events = pump.advance(T0 + 300)
    assert [e.payload["event"] for e in events] == ["pump_started"]
    status = pump.status().payload
    assert status["pump"]["running"] is True
    assert 4.5 < status["pump"]["current_amps"] < 5.5
    assert status["roof_tank"]["level_percent"] > 40  # 5 min x 40 L/min into a 500 L tank, minus household use
    pumped = (80 - status["ground_tank"]["level_percent"]) / 100 * pump.spec.ground_capacity_l
    assert pumped == pytest.approx(pump.spec.pump_lpm * 290 / 60, abs=5)  # started after the first 10 s step

    stopped = [e.payload for e in pump.advance(T0 + 3600)]  # the roof fills up: the pump stops, draws nothing
    assert [(e["event"], e["reason"]) for e in stopped] == [("pump_stopped", "roof_tank_full")]
    status = pump.status().payload
    assert status["pump"]["running"] is False and status["pump"]["current_amps"] == 0.0
    assert status["pump"]["daily_consumption"] > 0


def test_household_drains_roof_and_supply_fills_ground() -> None:
    """With the pump off, household use lowers the roof tank; the municipal supply raises the ground tank."""
    rng = random.Random(2)
    pump = PumpModel("p", rng, T0, ground_percent=50, roof_percent=80, supply_on=True, auto_mode=False)
    assert pump.advance(T0 + 3600) == []
    assert pump.roof_percent < 80
    assert pump.ground_percent == pytest.approx(50 + 25 * 60 / 3000 * 100, abs=0.1)


def test_dry_run_protection_trips_and_refuses_on() -> None:
    """Below 10 % in the ground tank the pump stops with dry_run_protection; `on` is refused unless forced."""
    rng = random.Random(3)
    pump = PumpModel("p", rng, T0, ground_percent=11, roof_percent=10, supply_on=False)
    events = [e.payload for e in pump.advance(T0 + 600)]
    names = [e["event"] for e in events]
    assert names == ["pump_started", "dry_run_protection", "pump_stopped"]
    assert events[2]["reason"] == "dry_run_protection"
    assert len({e["timestamp"] for e in events}) == 3  # distinct, or the bridge keeps only one
    status = pump.status().payload
    assert status["pump"]["running"] is False and status["pump"]["protection_active"] is True
    assert status["ground_tank"]["alarm_active"] is True

    with pytest.raises(CommandError, match="dry-run"):
        pump.command({"command": "pump", "state": "on"})
    _, summary, out = pump.command({"command": "pump", "state": "on", "force": True})
    assert summary["running"] is True and summary["manualOverride"] is True
    assert [m.channel for m in out] == ["event", "status"]


def test_overtime_protection_stops_a_long_run() -> None:
    """A run longer than the maximum stops with overtime_protection and auto mode waits for the cooldown."""
    spec = PumpSpec(max_run_s=300, overtime_cooldown_s=1800, roof_capacity_l=5000)
    pump = PumpModel("p", random.Random(4), T0, spec=spec, ground_percent=90, roof_percent=5, supply_on=True)
    names = [e.payload["event"] for e in pump.advance(T0 + 900)]
    assert names == ["pump_started", "overtime_protection", "pump_stopped"]
    assert pump.status().payload["pump"]["overtime_protection"] is True
    assert pump.advance(T0 + 1800) == []  # still cooling down although the roof tank is low
    assert [e.payload["event"] for e in pump.advance(T0 + 2200)] == ["pump_started"]  # cooldown ends at ~2110 s


def test_refused_command_answers_error() -> None:
    """The fleet answers a refused or unknown command with status error and the reason."""
    fleet = Fleet(FleetSpec(meters=1, vehicles=0, pumps=1, seed=1), T0)
    fleet.pumps["sim-pump-001"] = PumpModel("sim-pump-001", random.Random(5), T0, ground_percent=5)
    (res,) = fleet.command("pump", "sim-pump-001", {"commandId": "x", "command": "pump", "state": "on"}, T0 + 1)
    assert res.channel == "cmd/result" and res.payload["status"] == "error" and "dry-run" in res.payload["message"]
    (res,) = fleet.command("meter", "sim-meter-001", {"commandId": "y", "command": "explode"}, T0 + 2)
    assert res.payload == {"commandId": "y", "status": "error", "message": "unsupported command 'explode'"}
    assert fleet.command("meter", "sim-meter-001", {"command": "read_obis"}, T0 + 3) == []  # no commandId


def test_meter_register_and_interval_kwh_agree() -> None:
    """The register never decreases, each interval kWh is the register delta, and the day has a load shape."""
    meter = MeterModel("m", random.Random(6), T0, UTC, peak_kw=50.0)
    readings = []
    for k in range(1, 289):
        meter.advance(T0 + k * STEP)
        readings.append(meter.reading().payload)
    registers = [r["energyTotalKwh"] for r in readings]
    assert registers == sorted(registers)
    for prev, cur in itertools.pairwise(readings):
        assert cur["kwhConsumedAc"] == pytest.approx(cur["energyTotalKwh"] - prev["energyTotalKwh"], abs=1e-4)
    total = sum(r["kwhConsumedAc"] for r in readings[1:])
    assert total == pytest.approx(registers[-1] - registers[0], abs=1e-3)
    # interval energy matches the reported power (trapezoid of the endpoints) within a few percent
    by_power = sum((a["totalPowerKw"] + b["totalPowerKw"]) / 2 * STEP / 3600 for a, b in itertools.pairwise(readings))
    assert total == pytest.approx(by_power, rel=0.05)
    power = {round(local_hour(r["timestamp"] / 1000, UTC), 2): r["totalPowerKw"] for r in readings}
    assert power[3.0] < 0.5 * power[19.5]  # night low, evening peak
    assert all(225 < r["voltage"] < 235 and 49.9 < r["frequency"] < 50.1 for r in readings)


def test_read_obis_answers_and_publishes_values() -> None:
    """read_obis returns the requested codes (value * 10^scaler = the quantity) and publishes them on obis."""
    fleet = Fleet(FleetSpec(meters=1, vehicles=0, pumps=0, seed=1), T0)
    fleet.tick(T0 + STEP)
    meter = fleet.meters["sim-meter-001"]
    cmd = {"commandId": "r1", "command": "read_obis", "obisCodes": ["1-0:1.8.0.255", "1-0:32.7.0", "9-9:9.9.9"]}
    obis, res = fleet.command("meter", "sim-meter-001", cmd, T0 + STEP)
    assert (obis.channel, res.channel) == ("obis", "cmd/result")
    assert res.payload["status"] == "ok" and res.payload["data"]["unsupported"] == ["9-9:9.9.9"]
    readings = {r["obisCode"]: r for r in res.payload["data"]["readings"]}
    assert obis.payload["readings"] == res.payload["data"]["readings"]
    energy = readings["1-0:1.8.0.255"]
    assert energy["value"] * 10 ** energy["scaler"] == pytest.approx(meter.register, abs=1e-3)
    assert energy["unit"] == "kWh" and energy["quality"] == "good"
    assert readings["1-0:32.7.0"]["value"] * 10 ** readings["1-0:32.7.0"]["scaler"] == pytest.approx(
        meter.voltage, abs=0.1
    )
    (ack,) = fleet.command(
        "meter",
        "sim-meter-001",
        {"commandId": "w", "command": "write_obis", "obisCode": "0-0:1.0.0", "value": 1},
        T0 + STEP,
    )
    assert ack.payload["status"] == "ok"


def test_ev_efficiency_normal_and_faulty() -> None:
    """Over two days each charger's AC is DC ÷ efficiency: ≈0.9 normally, ≈0.8 for the faulty share."""
    fleet = Fleet(FleetSpec(meters=0, vehicles=6, pumps=0, seed=11, faulty=0.5), T0)
    out = run_fleet(fleet, 576)
    ratios = {}
    for pair in fleet.correlations():
        dc = sum(p["kwhDeliveredDc"] for p in of(out, pair["vehicleId"], "reading"))
        ac = sum(p["kwhConsumedAc"] for p in of(out, pair["meterId"], "reading"))
        assert dc > 10, f"{pair['vehicleId']} never charged"
        ratios[pair["vehicleId"]] = dc / ac
    faulty = sorted(r for r in ratios.values() if r < 0.85)
    normal = sorted(r for r in ratios.values() if r >= 0.85)
    assert len(faulty) == 3 and len(normal) == 3, ratios
    assert all(0.77 < r < 0.83 for r in faulty) and all(0.87 < r < 0.93 for r in normal), ratios
    socs = [p["soc"] for v in ratios for p in of(out, v, "reading")]
    assert all(0 <= s <= 100 for s in socs)


def test_clock_never_runs_ahead_of_the_wall() -> None:
    """A fast bounded run starts in the past and ends at now; an open one catches up and never passes now."""
    wall0 = 1_800_000_000.0
    history = default_history(speed=60, duration=100)
    clock = SimClock.starting(wall0, 60, history)
    assert clock.at(100, wall0 + 100) == pytest.approx(wall0 + 100)
    assert clock.at(50, wall0 + 50) < wall0 + 50
    open_clock = SimClock.starting(wall0, 60, default_history(speed=60, duration=None))
    for elapsed in (0, 1000, 1440, 5000):
        assert open_clock.at(elapsed, wall0 + elapsed) <= wall0 + elapsed
    assert default_history(speed=1, duration=None) == 0


# ---- on the real broker --------------------------------------------------------------------------


class Collector:
    """A paho subscriber recording (topic, payload, received_at) for the given filters."""

    def __init__(self, url: str, filters: list[str]) -> None:
        u = MqttUrl.parse(url)
        self.messages: list[tuple[str, bytes, datetime]] = []
        self._lock = threading.Lock()
        subscribed = threading.Event()
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=unique("collect"))
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *args: subscribed.set()
        self.client.connect(u.host, u.port)
        self.client.loop_start()
        self.client.subscribe([(f, 1) for f in filters])
        assert subscribed.wait(10), "no SUBACK"

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, bytes(msg.payload), datetime.now(UTC)))

    def snapshot(self) -> list[tuple[str, bytes, datetime]]:
        with self._lock:
            return list(self.messages)

    async def wait_for(self, predicate: Any, within: float = 5.0) -> tuple[str, bytes, datetime]:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            for m in self.snapshot():
                if predicate(m[0], m[1]):
                    return m
            await asyncio.sleep(0.02)
        raise AssertionError(f"nothing matched within {within} s; got {[t for t, _, _ in self.snapshot()][-20:]}")

    def publish(self, topic: str, payload: dict[str, Any]) -> None:
        self.client.publish(topic, orjson.dumps(payload), qos=1).wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def result_for(command_id: str) -> Any:
    def match(topic: str, payload: bytes) -> bool:
        return topic.endswith("/cmd/result") and orjson.loads(payload).get("commandId") == command_id

    return match


async def test_simulation_on_the_broker(mqtt_url: str) -> None:
    """1 pump + 1 meter + 1 EV publish decodable messages, answer commands, and say offline on stop."""
    prefix = unique("fw")
    config = SimConfig(
        mqtt=MqttUrl.parse(mqtt_url), meters=1, vehicles=1, pumps=1, interval=0.2, speed=60, seed=5, prefix=prefix
    )
    sim = Simulation(config)
    plural = {"meter": "meters", "vehicle": "vehicles", "pump": "pumps"}
    devices = sim.fleet.devices()
    collector = Collector(mqtt_url, [f"{plural[k]}/{d}/#" for k, d in devices])
    pump, meter = f"{prefix}-pump-001", f"{prefix}-meter-001"
    try:
        stop = asyncio.Event()
        async with sim:
            task = asyncio.create_task(sim.run(stop))
            await collector.wait_for(lambda t, p: t == f"pumps/{pump}/status")
            collector.publish(f"pumps/{pump}/cmd", {"commandId": "c-off", "command": "pump", "state": "off"})
            _, payload, _ = await collector.wait_for(result_for("c-off"))
            assert orjson.loads(payload)["status"] == "ok"
            collector.publish(f"pumps/{pump}/cmd", {"commandId": "c-on", "command": "pump", "state": "on"})
            _, payload, _ = await collector.wait_for(result_for("c-on"))
            answer = orjson.loads(payload)
            assert answer["status"] == "ok" and answer["data"]["running"] is True, answer
            collector.publish(
                f"meters/{meter}/cmd", {"commandId": "c-obis", "command": "read_obis", "obisCodes": ["1-0:1.8.0.255"]}
            )
            _, payload, _ = await collector.wait_for(result_for("c-obis"))
            assert orjson.loads(payload)["data"]["readings"][0]["obisCode"] == "1-0:1.8.0.255"
            await asyncio.sleep(0.5)
            stop.set()
            await asyncio.wait_for(task, 5)
        for _, device_id in devices:
            await collector.wait_for(lambda t, p, d=device_id: t.endswith(f"/{d}/online") and p == b"offline")
    finally:
        collector.close()

    decoder = Decoder(UTC)
    seen: dict[tuple[str, str], int] = {}
    presence: dict[str, list[bytes]] = {}
    for topic, payload, received in collector.snapshot():
        decoded = decoder.decode(topic, payload, received)
        if topic.endswith("/cmd"):
            assert decoded is None  # our own commands
            continue
        assert isinstance(decoded, Message), (topic, payload, decoded)
        kind, device_id, channel = topic.split("/", 2)
        seen[(kind, channel)] = seen.get((kind, channel), 0) + 1
        if channel == "online":
            presence.setdefault(device_id, []).append(payload)
        for record in decoded.records:
            ts = getattr(record, "ts", None)
            assert ts is None or ts <= received, f"{topic} is in the future: {ts} > {received}"
    assert set(seen) >= {
        ("meters", "reading"),
        ("meters", "obis"),
        ("meters", "cmd/result"),
        ("vehicles", "reading"),
        ("pumps", "status"),
        ("pumps", "event"),
        ("pumps", "cmd/result"),
    }
    assert seen[("meters", "reading")] >= 2 * 3  # two meters (one is the charger), several ticks
    assert {d: p[0] for d, p in presence.items()} == {d: b"online" for _, d in devices}
    assert {d: p[-1] for d, p in presence.items()} == {d: b"offline" for _, d in devices}


def _cli(mqtt_url: str, args: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "firmware_sim", *args],
        cwd=ROOT,
        env={**os.environ, "MQTT_URL": mqtt_url},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


async def test_cli_stops_cleanly_on_sigterm(mqtt_url: str) -> None:
    """`python -m firmware_sim` publishes readings and, on SIGTERM, offline (retained) and exit code 0."""
    prefix = unique("cli")
    meter = f"{prefix}-meter-001"
    collector = Collector(mqtt_url, [f"meters/{meter}/#"])
    args = ["--meters", "1", "--vehicles", "0", "--pumps", "0", "--interval", "0.2", "--prefix", prefix]
    proc = _cli(mqtt_url, args)
    try:
        await collector.wait_for(lambda t, p: t == f"meters/{meter}/reading", within=10)
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 10)
        assert code == 0, proc.stderr.read() if proc.stderr else b""
        await collector.wait_for(lambda t, p: t == f"meters/{meter}/online" and p == b"offline")
    finally:
        if proc.poll() is None:
            proc.kill()
        collector.close()
