"""Simulated device physics and state: pure, deterministic, no I/O.

Every device owns a `random.Random` seeded from (seed, kind, index) and is advanced to absolute
simulated times (epoch seconds). The same seed and the same sequence of times give the same messages,
whatever the device ids are called. What leaves a device is an `Outbound` (topic parts + JSON-able
payload); `devices.py` puts those on the wire.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from typing import Any

from bridge import topics
from bridge.topics import Kind

DAY = 86400.0


# ---- time ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SimClock:
    """Simulated time: `start + elapsed * speed`, but never later than the wall clock.

    The bridge dead-letters timestamps more than a few minutes in the future, so a fast simulation
    starts in the past (`history` seconds before now) and fast-forwards; once it has caught up with
    the wall clock it carries on in real time instead of overtaking it.
    """

    start: float  # epoch seconds of simulated time at elapsed 0
    speed: float

    @classmethod
    def starting(cls, wall: float, speed: float, history: float) -> SimClock:
        return cls(start=wall - history, speed=speed)

    def at(self, elapsed: float, wall: float) -> float:
        return min(self.start + elapsed * self.speed, wall)


def default_history(speed: float, duration: float | None) -> float:
    """How far in the past simulated time starts: a bounded run ends at "now"; an open one replays a day."""
    if speed <= 1.0:
        return 0.0
    if duration is not None:
        return duration * (speed - 1.0)
    return DAY


def epoch_ms(t: float) -> int:
    return round(t * 1000.0)


class Stamps:
    """Strictly increasing epoch-ms for one message stream: the bridge keeps one message per
    (device, timestamp, kind), so two messages of a stream must never share a millisecond."""

    def __init__(self) -> None:
        self.last = -1

    def next(self, t: float) -> int:
        ms = max(epoch_ms(t), self.last + 1)
        self.last = ms
        return ms


def spans(t0: float, t1: float, max_step: float) -> Iterator[tuple[float, float]]:
    """Split [t0, t1] into equal sub-steps of at most `max_step`: yields (end time, dt)."""
    if t1 <= t0:
        return
    n = max(1, math.ceil((t1 - t0) / max_step - 1e-9))
    dt = (t1 - t0) / n
    for i in range(1, n + 1):
        yield (t1 if i == n else t0 + i * dt), dt


def local_hour(t: float, tz: tzinfo) -> float:
    d = datetime.fromtimestamp(t, tz)
    return d.hour + d.minute / 60.0 + d.second / 3600.0


def _bump(hour: float, centre: float, width: float) -> float:
    d = abs(hour - centre)
    d = min(d, 24.0 - d)  # the day wraps around midnight
    return math.exp(-0.5 * (d / width) ** 2)


def daily_shape(hour: float) -> float:
    """Relative demand by local hour: ~0.3 at night, a morning peak near 08:00, the highest near 19:30."""
    return 0.3 + 0.55 * _bump(hour, 8.0, 1.5) + 0.2 * _bump(hour, 13.0, 3.0) + 0.75 * _bump(hour, 19.5, 2.0)


def clamp(x: float, lo: float, hi: float) -> float:
    return lo if x < lo else hi if x > hi else x


# ---- messages ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outbound:
    """One message a device publishes (QoS 1)."""

    kind: Kind
    device_id: str
    channel: str
    payload: dict[str, Any]

    @property
    def topic(self) -> str:
        return topics.device_topic(self.kind, self.device_id, self.channel)


def result(kind: Kind, device_id: str, command_id: str, ok: bool, message: str | None, data: Any) -> Outbound:
    body: dict[str, Any] = {"commandId": command_id, "status": "ok" if ok else "error"}
    if message is not None:
        body["message"] = message
    if data is not None:
        body["data"] = data
    return Outbound(kind, device_id, "cmd/result", body)


class CommandError(Exception):
    """A command the device refuses: becomes a cmd/result with status `error` and this message."""


# ---- smart meter ---------------------------------------------------------------------------------

# OBIS code (without the ".255" billing group) → (unit, scaler, value reader). The wire value is an
# integer and value * 10^scaler is the quantity, as a DLMS meter reports it.
_OBIS: dict[str, tuple[str | None, int, str]] = {
    "1-0:1.8.0": ("kWh", -3, "import_kwh"),
    "1-0:2.8.0": ("kWh", -3, "export_kwh"),
    "1-0:1.7.0": ("kW", -3, "power_kw"),
    "1-0:2.7.0": ("kW", -3, "export_kw"),
    "1-0:32.7.0": ("V", -1, "voltage_l1"),
    "1-0:52.7.0": ("V", -1, "voltage_l2"),
    "1-0:72.7.0": ("V", -1, "voltage_l3"),
    "1-0:31.7.0": ("A", -2, "current"),
    "1-0:51.7.0": ("A", -2, "current"),
    "1-0:71.7.0": ("A", -2, "current"),
    "1-0:14.7.0": ("Hz", -2, "frequency"),
    "1-0:13.7.0": (None, -3, "power_factor"),
}
DEFAULT_OBIS = ("1-0:1.8.0.255", "1-0:1.7.0.255", "1-0:32.7.0.255", "1-0:31.7.0.255", "1-0:14.7.0.255")


def _obis_key(code: str) -> str:
    parts = code.split(".")
    return ".".join(parts[:3]) if len(parts) == 4 and parts[3] == "255" else code


class MeterModel:
    """A three-phase smart meter: a daily load shape (or its vehicle's charger) behind a kWh register."""

    MAX_STEP = 60.0

    def __init__(
        self,
        device_id: str,
        rng: random.Random,
        t: float,
        tz: tzinfo = UTC,
        *,
        peak_kw: float | None = None,
        register_kwh: float | None = None,
        fed: bool = False,
    ) -> None:
        self.id, self.rng, self.t, self.tz = device_id, rng, t, tz
        self.fed = fed  # a charger's meter: energy comes from `feed`, not the load shape
        self.peak_kw = rng.uniform(20.0, 80.0) if peak_kw is None else peak_kw
        if register_kwh is None:
            register_kwh = rng.uniform(100.0, 5000.0) if fed else rng.uniform(1000.0, 50000.0)
        self.register = register_kwh
        self.reported = round(self.register, 4)  # register at the previous report
        self.noise = 0.0
        self.power_kw = 0.0 if fed else self.peak_kw * daily_shape(local_hour(t, tz))
        self.voltage = 230.0
        self.phase_offsets = (rng.gauss(0, 0.8), rng.gauss(0, 0.8))
        self.frequency = 50.0
        self.power_factor = 0.99 if fed else rng.uniform(0.92, 0.98)
        self.readings = Stamps()
        self.obis = Stamps()

    def advance(self, to: float) -> None:
        if self.fed:
            return
        for end, dt in spans(self.t, to, self.MAX_STEP):
            self.noise = 0.85 * self.noise + self.rng.gauss(0.0, 0.04)  # AR(1): load wanders, not jitters
            kw = max(0.0, self.peak_kw * daily_shape(local_hour(end, self.tz)) * (1.0 + self.noise))
            self.register += (self.power_kw + kw) / 2.0 * dt / 3600.0  # trapezoid over the sub-step
            self.power_kw = kw
        self.t = max(self.t, to)

    def feed(self, to: float, kwh: float, kw: float) -> None:
        self.register += kwh
        self.power_kw = kw
        self.t = max(self.t, to)

    @property
    def current(self) -> float:
        # per-phase current of a balanced three-phase load at 230 V phase voltage
        return self.power_kw * 1000.0 / (3.0 * self.voltage * self.power_factor)

    def reading(self) -> Outbound:
        rng = self.rng
        self.voltage = 230.0 + rng.gauss(0.0, 1.5)
        self.frequency = 50.0 + rng.gauss(0.0, 0.02)
        if not self.fed:
            self.power_factor = clamp(self.power_factor + rng.gauss(0.0, 0.005), 0.85, 0.99)
        register = round(self.register, 4)
        interval = round(max(0.0, register - self.reported), 4)
        self.reported = register
        payload = {
            "meterId": self.id,
            "totalPowerKw": round(self.power_kw, 3),
            "energyTotalKwh": register,
            "kwhConsumedAc": interval,
            "voltage": round(self.voltage, 1),
            "current": round(self.current, 2),
            "frequency": round(self.frequency, 3),
            "powerFactor": round(self.power_factor, 3),
            "timestamp": self.readings.next(self.t),
        }
        return Outbound("meter", self.id, "reading", payload)

    def _quantity(self, name: str) -> float:
        values = {
            "import_kwh": self.register,
            "export_kwh": 0.0,
            "power_kw": self.power_kw,
            "export_kw": 0.0,
            "voltage_l1": self.voltage,
            "voltage_l2": self.voltage + self.phase_offsets[0],
            "voltage_l3": self.voltage + self.phase_offsets[1],
            "current": self.current,
            "frequency": self.frequency,
            "power_factor": self.power_factor,
        }
        return values[name]

    def command(self, data: dict[str, Any]) -> tuple[str | None, Any, list[Outbound]]:
        """Answer `read_obis` (and publish the values on `obis`) and acknowledge `write_obis`."""
        command = data.get("command")
        if command == "read_obis":
            codes = data.get("obisCodes", list(DEFAULT_OBIS))
            if not isinstance(codes, list) or not all(isinstance(c, str) for c in codes):
                raise CommandError("obisCodes must be a list of OBIS code strings")
            readings, unsupported = [], []
            for code in dict.fromkeys(codes):
                spec = _OBIS.get(_obis_key(code))
                if spec is None:
                    unsupported.append(code)
                    continue
                unit, scaler, name = spec
                value = round(self._quantity(name) / 10.0**scaler)
                readings.append({"obisCode": code, "value": value, "unit": unit, "scaler": scaler, "quality": "good"})
            if not readings:
                raise CommandError(f"no supported OBIS code among {codes}")
            stamp = self.obis.next(self.t)
            out: dict[str, Any] = {"readings": readings, "timestamp": stamp}
            if unsupported:
                out["unsupported"] = unsupported
            return None, out, [Outbound("meter", self.id, "obis", {"readings": readings, "timestamp": stamp})]
        if command == "write_obis":
            written = {k: v for k, v in data.items() if k not in ("commandId", "command")}
            return "written", written or None, []
        raise CommandError(f"unsupported command {command!r}")


# ---- electric vehicle ----------------------------------------------------------------------------


class VehicleModel:
    """An EV alternating between trips (SoC drains) and charging sessions on its own charger.

    DC energy into the battery is what the vehicle reports; the charger's AC meter sees DC ÷ efficiency.
    """

    MAX_STEP = 60.0

    def __init__(
        self, device_id: str, rng: random.Random, t: float, *, efficiency: float, soc: float | None = None
    ) -> None:
        self.id, self.rng, self.t = device_id, rng, t
        self.efficiency = efficiency
        self.capacity_kwh = rng.choice((50.0, 60.0, 75.0, 82.0))
        self.max_kw = rng.choice((11.0, 22.0, 50.0))
        self.soc = rng.uniform(20.0, 90.0) if soc is None else soc
        self.ambient = rng.uniform(12.0, 25.0)
        self.temp = self.ambient + rng.uniform(0.0, 3.0)
        self.state = "away"
        self.until = t
        self.target = 90.0
        self.drive_kw = 6.0
        if rng.random() < 0.5:
            self._plug_in()
        else:
            self._leave(t)
        self.dc_kw = 0.0
        self.ac_kw = 0.0
        self.dc_total = 0.0
        self.reported = 0.0
        self.stamps = Stamps()

    def _plug_in(self) -> None:
        self.state, self.target = "charging", self.rng.uniform(80.0, 100.0)

    def _leave(self, now: float) -> None:
        self.state, self.until = "away", now + self.rng.uniform(3600.0, 5 * 3600.0)
        self.drive_kw = self.rng.uniform(3.0, 12.0)

    def _taper(self) -> float:
        return 1.0 if self.soc < 80.0 else max(0.15, (100.0 - self.soc) / 20.0)

    def advance(self, to: float) -> tuple[float, float]:
        """Move to `to`; return (DC kWh into the battery, AC kWh drawn by the charger) over the span."""
        dc_sum = ac_sum = 0.0
        rng = self.rng
        for end, dt in spans(self.t, to, self.MAX_STEP):
            dc_kw = 0.0
            if self.state == "charging":
                if self.soc >= self.target:
                    self.state, self.until = "plugged", end + rng.uniform(900.0, 7200.0)
                else:
                    dc_kw = self.max_kw * self._taper() * (1.0 + rng.gauss(0.0, 0.01))
                    kwh = dc_kw * dt / 3600.0
                    eff = clamp(self.efficiency * (1.0 + rng.gauss(0.0, 0.005)), 0.5, 0.99)
                    self.soc = min(100.0, self.soc + kwh / self.capacity_kwh * 100.0)
                    dc_sum += kwh
                    ac_sum += kwh / eff
            elif self.state == "plugged":
                if end >= self.until:
                    self._leave(end)
            else:  # away: driving drains the battery until the trip ends or the battery runs low
                self.soc = max(3.0, self.soc - self.drive_kw * dt / 3600.0 / self.capacity_kwh * 100.0)
                if end >= self.until or self.soc < 15.0:
                    self._plug_in()
            heat = 0.3 * dc_kw if self.state == "charging" else 4.0 if self.state == "away" else 0.0
            self.temp += (self.ambient + heat - self.temp) * (1.0 - math.exp(-dt / 1800.0))
            self.dc_kw = dc_kw
        self.t = max(self.t, to)
        self.ac_kw = self.dc_kw / self.efficiency
        self.dc_total += dc_sum
        return dc_sum, ac_sum

    def reading(self) -> Outbound:
        total = round(self.dc_total, 4)
        delivered = round(max(0.0, total - self.reported), 4)
        self.reported = total
        payload = {
            "vehicleId": self.id,
            "soc": round(clamp(self.soc, 0.0, 100.0), 2),
            "kwhDeliveredDc": delivered,
            "batteryTemp": round(self.temp + self.rng.gauss(0.0, 0.1), 1),
            "timestamp": self.stamps.next(self.t),
        }
        return Outbound("vehicle", self.id, "reading", payload)


# ---- ESP32 pump controller -----------------------------------------------------------------------


@dataclass(frozen=True)
class PumpSpec:
    ground_capacity_l: float = 3000.0
    roof_capacity_l: float = 500.0
    ground_height_in: float = 28.0
    roof_height_in: float = 32.0
    pump_lpm: float = 40.0
    supply_lpm: float = 25.0
    household_lpm: float = 4.0  # at a daily_shape of 1.0: the roof tank cycles every few hours
    amps: float = 5.0
    volts: float = 230.0
    auto_start_percent: float = 30.0
    auto_stop_percent: float = 95.0
    dry_run_percent: float = 10.0
    dry_run_clear_percent: float = 20.0
    max_run_s: float = 45 * 60.0
    overtime_cooldown_s: float = 30 * 60.0


class PumpModel:
    """Two tanks and a pump: the pump lifts water ground → roof, the household drains the roof tank,
    the municipal supply (on for a few hours now and then) refills the ground tank.

    Auto mode starts the pump below `auto_start_percent` on the roof and stops it at `auto_stop_percent`.
    Dry-run protection stops it when the ground tank falls below `dry_run_percent` and latches until
    `dry_run_clear_percent`; overtime protection stops a run after `max_run_s` and blocks for a cooldown.
    A manual `pump` command takes the controller out of automatic control until an `auto_mode` command.
    """

    MAX_STEP = 10.0

    def __init__(
        self,
        device_id: str,
        rng: random.Random,
        t: float,
        tz: tzinfo = UTC,
        *,
        spec: PumpSpec | None = None,
        ground_percent: float | None = None,
        roof_percent: float | None = None,
        supply_on: bool | None = None,
        auto_mode: bool = True,
    ) -> None:
        self.id, self.rng, self.t, self.tz = device_id, rng, t, tz
        self.spec = s = spec or PumpSpec()
        self.ground_l = (
            s.ground_capacity_l * (rng.uniform(50.0, 95.0) if ground_percent is None else ground_percent) / 100
        )
        self.roof_l = s.roof_capacity_l * (rng.uniform(35.0, 90.0) if roof_percent is None else roof_percent) / 100
        self.supply_on = rng.random() < 0.3 if supply_on is None else supply_on
        # an explicit supply state holds (tests); a random one follows its schedule
        self.supply_until = self._supply_duration(t) if supply_on is None else math.inf
        self.amps_offset = rng.uniform(-0.2, 0.2)
        self.auto_mode = auto_mode
        self.manual_override = False
        self.running = False
        self.forced = False
        self.run_reason = ""
        self.run_started = t
        self.dry_run = False
        self.overtime_until: float | None = None
        self.total_runtime_s = 0.0
        self.day_kwh = 0.0
        self.hour_kwh = 0.0
        self.period = self._period(t)
        self.status_stamps = Stamps()
        self.event_stamps = Stamps()
        self._events: list[Outbound] = []

    # -- state ------------------------------------------------------------------------------------

    @property
    def ground_percent(self) -> float:
        return self.ground_l / self.spec.ground_capacity_l * 100.0

    @property
    def roof_percent(self) -> float:
        return self.roof_l / self.spec.roof_capacity_l * 100.0

    @property
    def protection_active(self) -> bool:
        return self.dry_run or self.overtime_until is not None

    def _period(self, t: float) -> tuple[str, int]:
        d = datetime.fromtimestamp(t, self.tz)
        return d.date().isoformat(), d.hour

    def _supply_duration(self, now: float) -> float:
        hours = self.rng.uniform(0.5, 2.0) if self.supply_on else self.rng.uniform(3.0, 8.0)
        return now + hours * 3600.0

    # -- physics ----------------------------------------------------------------------------------

    def advance(self, to: float) -> list[Outbound]:
        """Move to `to`; return the events raised on the way."""
        s = self.spec
        for end, dt in spans(self.t, to, self.MAX_STEP):
            if end >= self.supply_until:
                self.supply_on = not self.supply_on
                self.supply_until = self._supply_duration(end)
            use = s.household_lpm * daily_shape(local_hour(end, self.tz)) * (1.0 + self.rng.gauss(0.0, 0.2))
            self.roof_l = max(0.0, self.roof_l - max(0.0, use) * dt / 60.0)
            if self.supply_on:
                self.ground_l = min(s.ground_capacity_l, self.ground_l + s.supply_lpm * dt / 60.0)
            period = self._period(end)
            if period[0] != self.period[0]:
                self.day_kwh = 0.0
            if period != self.period:
                self.hour_kwh = 0.0
            self.period = period
            if self.running:
                moved = min(s.pump_lpm * dt / 60.0, self.ground_l, s.roof_capacity_l - self.roof_l)
                self.ground_l -= moved
                self.roof_l += moved
                kwh = s.amps * s.volts * dt / 3.6e6
                self.day_kwh += kwh
                self.hour_kwh += kwh
                self.total_runtime_s += dt
            self.t = end
            self._control(end)
        self.t = max(self.t, to)
        events, self._events = self._events, []
        return events

    def _control(self, now: float) -> None:
        s = self.spec
        if self.dry_run and self.ground_percent >= s.dry_run_clear_percent:
            self.dry_run = False
        if self.overtime_until is not None and now >= self.overtime_until:
            self.overtime_until = None
        if self.running:
            if self.ground_percent < s.dry_run_percent and not self.forced:
                self.dry_run = True
                self._event(now, "dry_run_protection", ground_tank_percent=round(self.ground_percent, 1))
                self._stop(now, "dry_run_protection")
            elif now - self.run_started >= s.max_run_s:
                self.overtime_until = now + s.overtime_cooldown_s
                self._event(now, "overtime_protection", runtime_minutes=round((now - self.run_started) / 60.0, 1))
                self._stop(now, "overtime_protection")
            elif self.ground_l <= 0.0:
                self._stop(now, "ground_tank_empty")  # a forced run pumped the tank dry
            elif self.roof_percent >= (s.auto_stop_percent if self.run_reason == "auto" else 99.5):
                self._stop(now, "roof_tank_full")
        elif self.auto_mode and not self.manual_override and self.roof_percent < s.auto_start_percent:
            if self.protection_active:
                return
            if self.ground_percent < s.dry_run_percent:
                self.dry_run = True
                self._event(now, "dry_run_protection", ground_tank_percent=round(self.ground_percent, 1))
            else:
                self._start(now, "auto")

    def _event(self, now: float, name: str, **fields: Any) -> None:
        payload = {"device_id": self.id, "event": name, "timestamp": self.event_stamps.next(now), **fields}
        self._events.append(Outbound("pump", self.id, "event", payload))

    def _start(self, now: float, reason: str) -> None:
        self.running, self.run_reason, self.run_started = True, reason, now
        self._event(
            now,
            "pump_started",
            reason=reason,
            ground_tank_percent=round(self.ground_percent, 1),
            roof_tank_percent=round(self.roof_percent, 1),
        )

    def _stop(self, now: float, reason: str) -> None:
        minutes = round((now - self.run_started) / 60.0, 1)
        self.running, self.forced = False, False
        self._event(now, "pump_stopped", reason=reason, runtime_minutes=minutes)

    # -- messages ---------------------------------------------------------------------------------

    def _tank(self, level_l: float, capacity_l: float, height_in: float, alarm: bool, inflow: bool) -> dict[str, Any]:
        return {
            "level_percent": round(level_l / capacity_l * 100.0, 1),
            "level_inches": round(level_l / capacity_l * height_in, 1),
            "alarm_active": alarm,
            "connected": True,
            "sensor_working": True,
            "water_supply_on": inflow,
        }

    def status(self) -> Outbound:
        s = self.spec
        amps = max(0.0, s.amps + self.amps_offset + self.rng.gauss(0.0, 0.1)) if self.running else 0.0
        ground_full = self.ground_l >= s.ground_capacity_l
        payload = {
            "device_id": self.id,
            "timestamp": self.status_stamps.next(self.t),
            "ground_tank": self._tank(
                self.ground_l,
                s.ground_capacity_l,
                s.ground_height_in,
                self.ground_percent < s.dry_run_percent,
                self.supply_on and not ground_full,
            ),
            "roof_tank": self._tank(
                self.roof_l, s.roof_capacity_l, s.roof_height_in, self.roof_percent < 10.0, self.running
            ),
            "pump": {
                "running": self.running,
                "manual_override": self.manual_override,
                "current_amps": round(amps, 2),
                "power_watts": round(amps * s.volts, 1),
                "daily_consumption": round(self.day_kwh, 3),
                "hourly_consumption": round(self.hour_kwh, 3),
                "runtime_minutes": round((self.t - self.run_started) / 60.0, 1) if self.running else 0.0,
                "total_runtime_hours": round(self.total_runtime_s / 3600.0, 2),
                "protection_active": self.protection_active,
                "overcurrent_protection": False,
                "overtime_protection": self.overtime_until is not None,
            },
            "system": {
                "auto_mode_enabled": self.auto_mode,
                "manual_pump_control": self.manual_override,
                "water_supply_active": self.supply_on,
            },
        }
        return Outbound("pump", self.id, "status", payload)

    def _summary(self) -> dict[str, Any]:
        return {
            "running": self.running,
            "autoMode": self.auto_mode,
            "manualOverride": self.manual_override,
            "protectionActive": self.protection_active,
            "groundTankPercent": round(self.ground_percent, 1),
            "roofTankPercent": round(self.roof_percent, 1),
        }

    def command(self, data: dict[str, Any]) -> tuple[str | None, Any, list[Outbound]]:
        """Obey `pump` on/off and `auto_mode`; return (message, data, events + the new status)."""
        now, s = self.t, self.spec
        command = data.get("command")
        message: str | None = None
        if command == "pump":
            state = data.get("state")
            if state == "on":
                force = data.get("force") is True
                if not force and (self.dry_run or self.ground_percent < s.dry_run_percent):
                    raise CommandError(
                        f"dry-run protection: ground tank at {self.ground_percent:.1f} % (send force to override)"
                    )
                if not force and self.overtime_until is not None:
                    raise CommandError("overtime protection is cooling down (send force to override)")
                self.manual_override = True
                if self.running:
                    message = "pump already running"
                    self.forced = self.forced or force
                else:
                    self.forced = force
                    self._start(now, "manual")
            elif state == "off":
                self.manual_override = True
                if self.running:
                    self._stop(now, "manual")
                else:
                    message = "pump already stopped"
            else:
                raise CommandError("state must be 'on' or 'off'")
        elif command == "auto_mode":
            enabled = data.get("enabled")
            if not isinstance(enabled, bool):
                raise CommandError("enabled must be true or false")
            self.auto_mode, self.manual_override = enabled, False
            self._control(now)
        elif command not in ("status", "get_status"):
            raise CommandError(f"unsupported command {command!r}")
        events, self._events = self._events, []
        return message, self._summary(), [*events, self.status()]


# ---- the fleet -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FleetSpec:
    meters: int = 2
    vehicles: int = 1
    pumps: int = 1
    seed: int = 1
    faulty: float = 0.0  # share of vehicles whose charger wastes ~20 % (efficiency ≈ 0.8)
    prefix: str = "sim"
    tz: tzinfo = field(default=UTC)


def meter_id(prefix: str, i: int) -> str:
    return f"{prefix}-meter-{i:03d}"


def vehicle_id(prefix: str, i: int) -> str:
    return f"{prefix}-ev-{i:03d}"


def charger_id(vehicle: str) -> str:
    return f"{vehicle}-charger"


def pump_id(prefix: str, i: int) -> str:
    return f"{prefix}-pump-{i:03d}"


def correlations(prefix: str, vehicles: int) -> list[dict[str, str]]:
    """Each vehicle and the AC meter of its charger, as `/v1/ingestion/correlate` takes them."""
    return [
        {"vehicleId": vehicle_id(prefix, i), "meterId": charger_id(vehicle_id(prefix, i))}
        for i in range(1, vehicles + 1)
    ]


def _rng(seed: int, kind: str, index: int) -> random.Random:
    # string seeds are hashed with SHA-512: stable across processes, unlike hash()
    return random.Random(f"{seed}:{kind}:{index}")


class Fleet:
    """Every simulated device, advanced together to one simulated time."""

    def __init__(self, spec: FleetSpec, t0: float) -> None:
        for n in (spec.meters, spec.vehicles, spec.pumps):
            if n < 0:
                raise ValueError("device counts must be >= 0")
        if not 0.0 <= spec.faulty <= 1.0:
            raise ValueError("faulty must be a share between 0 and 1")
        self.spec, self.t = spec, t0
        p, tz = spec.prefix, spec.tz
        self.meters: dict[str, MeterModel] = {
            meter_id(p, i): MeterModel(meter_id(p, i), _rng(spec.seed, "meter", i), t0, tz)
            for i in range(1, spec.meters + 1)
        }
        faulty = set(random.Random(f"{spec.seed}:faulty").sample(range(1, spec.vehicles + 1), self.faulty_count))
        self.vehicles: dict[str, tuple[VehicleModel, MeterModel]] = {}
        for i in range(1, spec.vehicles + 1):
            vid = vehicle_id(p, i)
            rng = _rng(spec.seed, "vehicle", i)
            efficiency = rng.uniform(0.78, 0.82) if i in faulty else rng.uniform(0.88, 0.92)
            vehicle = VehicleModel(vid, rng, t0, efficiency=efficiency)
            charger = MeterModel(charger_id(vid), _rng(spec.seed, "charger", i), t0, tz, fed=True)
            self.vehicles[vid] = (vehicle, charger)
        self.chargers = {charger.id: charger for _, charger in self.vehicles.values()}
        self.pumps: dict[str, PumpModel] = {
            pump_id(p, i): PumpModel(pump_id(p, i), _rng(spec.seed, "pump", i), t0, tz)
            for i in range(1, spec.pumps + 1)
        }
        for _, device_id in self.devices():
            if not topics.DEVICE_ID.match(device_id):
                raise ValueError(f"device id {device_id!r} must be 1-64 of [A-Za-z0-9_.:-]: change the prefix")

    @property
    def faulty_count(self) -> int:
        return round(self.spec.faulty * self.spec.vehicles)

    def devices(self) -> list[tuple[Kind, str]]:
        out: list[tuple[Kind, str]] = [("meter", m) for m in self.meters]
        for vid, (_, charger) in self.vehicles.items():
            out += [("vehicle", vid), ("meter", charger.id)]
        out += [("pump", pid) for pid in self.pumps]
        return out

    def correlations(self) -> list[dict[str, str]]:
        return correlations(self.spec.prefix, self.spec.vehicles)

    def advance(self, to: float) -> list[Outbound]:
        """Move every device to `to` (never backwards); return the pump events raised on the way."""
        to = max(to, self.t)
        for meter in self.meters.values():
            meter.advance(to)
        for vehicle, charger in self.vehicles.values():
            _, ac_kwh = vehicle.advance(to)
            charger.feed(to, ac_kwh, vehicle.ac_kw)
        events = [e for pump in self.pumps.values() for e in pump.advance(to)]
        self.t = to
        return events

    def report(self) -> list[Outbound]:
        out = [m.reading() for m in self.meters.values()]
        for vehicle, charger in self.vehicles.values():
            out += [vehicle.reading(), charger.reading()]
        out += [pump.status() for pump in self.pumps.values()]
        return out

    def tick(self, to: float) -> list[Outbound]:
        """One report cycle: advance to `to`, then every device reports."""
        return [*self.advance(to), *self.report()]

    def command(self, kind: Kind, device_id: str, data: Any, now: float) -> list[Outbound]:
        """Run one command received on `{kind}s/{device_id}/cmd`; answer on cmd/result.

        A payload without a usable `commandId` cannot be answered and is dropped.
        """
        if not isinstance(data, dict):
            return []
        command_id = data.get("commandId")
        if not isinstance(command_id, str) or not command_id:
            return []
        out = self.advance(now)
        device: MeterModel | PumpModel | None = None
        if kind == "meter":
            device = self.meters.get(device_id) or self.chargers.get(device_id)
        elif kind == "pump":
            device = self.pumps.get(device_id)
        try:
            if device is None:
                raise CommandError(f"unsupported command {data.get('command')!r}")
            message, answer, extra = device.command(data)
        except CommandError as exc:
            return [*out, result(kind, device_id, command_id, False, str(exc), None)]
        # the data first, then the answer: whoever waits for the result finds the data already sent
        return [*out, *extra, result(kind, device_id, command_id, True, message, answer)]
