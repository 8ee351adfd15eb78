"""Alerts: rules evaluated on each batch the writer stores, inside the batch's own transaction.

An alert is raised when its watched value leaves the rule's band `[threshold_low, threshold_high]` and
resolved only once the value is back within `[clear_low, clear_high]` (hysteresis: a value wandering
between a threshold and its clear bound changes nothing). Flag rules (sensor offline, protection,
device offline) raise while the flag is set and resolve when it is cleared.

Because evaluation runs in the writer's transaction, an alert commits together with the data that
caused it: a crash loses neither, and a redelivered message (a repeat, not stored again) is not
evaluated again, so nothing is raised twice. The table keeps at most one active alert per (device,
rule) (a unique partial index) and every raise and resolve is also written to `alert_events`.

The hot path stays in Python: rules, active alerts and the device maxima are cached and reloaded every
RELOAD_EVERY seconds, at once on a `NOTIFY alert_rules` (the API sends one on each rule change) and on a
new database connection. A batch costs no extra statement unless something changes (then one to
resolve and one to raise) or it carries vehicle/correlated-meter data (one 24-hour efficiency query).

Rule precedence per (type, target): a device's own rules replace those of its kind, which replace rules
for every kind. A disabled device rule therefore silences that alert for the device.
"""

from __future__ import annotations

import logging
import math
import time
import weakref
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, NamedTuple, Protocol

import orjson
import psycopg

from . import topics
from .arrays import Texts
from .telemetry import Decoded, Message, MeterReading, ObisReading, PumpStatus, Stored, VehicleReading

log = logging.getLogger(__name__)

RULES_CHANNEL = "alert_rules"  # NOTIFY channel: rules changed, reload them
RELOAD_EVERY = 10.0
SEVERITIES = ("info", "low", "warning", "medium", "high", "critical")
TANKS = ("ground_tank", "roof_tank")
# OBIS codes (value group C.D.E) the meter rules watch: phase voltages L1-L3 and frequency
OBIS_VOLTAGE = frozenset({"32.7.0", "52.7.0", "72.7.0"})
OBIS_FREQUENCY = "14.7.0"

Value = bool | tuple[float, ...]  # a flag, or the number(s) seen at one instant (e.g. three phases)
Key = tuple[str, int]  # (device_id, rule_id)
# judged at the time of the batch, not at a record's own time: never held back as late history
LIVE_TYPES = frozenset({"device_offline", "low_efficiency"})


@dataclass(frozen=True)
class Spec:
    """What an alert type watches."""

    kind: str | None  # the device kind it applies to; None: every kind
    numeric: bool  # a band rule on a number; otherwise a flag
    label: str
    unit: str = ""
    targets: tuple[str, ...] = ()  # a rule of this type names one of these


TYPES: dict[str, Spec] = {
    "low_water": Spec("pump", True, "level", "%", TANKS),
    "sensor_offline": Spec("pump", False, "level sensor", targets=TANKS),
    "pump_protection": Spec("pump", False, "pump protection"),
    "overcurrent": Spec("pump", True, "pump current", "A"),
    "pump_overtime": Spec("pump", True, "pump runtime", "min"),
    "voltage_out_of_range": Spec("meter", True, "voltage", "V"),
    "frequency_out_of_range": Spec("meter", True, "frequency", "Hz"),
    "low_efficiency": Spec("vehicle", True, "24-hour charging efficiency"),
    "battery_temp_high": Spec("vehicle", True, "battery temperature", "°C"),
    "device_offline": Spec(None, False, "device"),
}


# ---- rules and their verdicts (pure) -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rule:
    id: int
    type: str
    device_id: str | None = None
    kind: str | None = None
    target: str | None = None
    low: float | None = None
    high: float | None = None
    clear_low: float | None = None
    clear_high: float | None = None
    severity: str = "warning"
    enabled: bool = True

    def breached(self, value: Value) -> bool:
        if isinstance(value, bool):
            return value
        return (self.low is not None and min(value) < self.low) or (self.high is not None and max(value) > self.high)

    def cleared(self, value: Value) -> bool:
        if isinstance(value, bool):
            return not value
        low = self.clear_low if self.clear_low is not None else self.low
        high = self.clear_high if self.clear_high is not None else self.high
        return (low is None or min(value) >= low) and (high is None or max(value) <= high)

    def worst(self, value: Value) -> float | None:
        """The one number that tells how far out the value is (the lowest or the highest seen)."""
        if isinstance(value, bool):
            return None
        lo, hi = min(value), max(value)
        if self.high is not None and (self.low is None or hi - self.high >= self.low - lo):
            return hi
        return lo


def step(active: bool, rule: Rule, value: Value) -> bool:
    """The alert's state after seeing `value`: raised on a breach, resolved only once cleared."""
    if active:
        return not rule.cleared(value)
    return rule.breached(value)


def with_device_max(rule: Rule, device_max: float | None) -> Rule:
    """Overcurrent against the device's own maximum (its meta `pump_max_current`), same hysteresis gap.

    A rule written for the device itself keeps its own thresholds.
    """
    if rule.type != "overcurrent" or device_max is None or rule.device_id is not None:
        return rule
    gap = rule.high - rule.clear_high if rule.high is not None and rule.clear_high is not None else 0.0
    return replace(rule, high=device_max, clear_high=device_max - gap)


def applicable(rules: Iterable[Rule], device_id: str, kind: str) -> list[Rule]:
    """The enabled rules for one device: per (type, target) only the most specific level counts."""
    best: dict[tuple[str, str | None], tuple[int, list[Rule]]] = {}
    for r in rules:
        if (r.device_id is not None and r.device_id != device_id) or (r.kind is not None and r.kind != kind):
            continue
        spec = TYPES.get(r.type)
        if spec is None or (spec.kind is not None and spec.kind != kind):
            continue
        rank = 2 if r.device_id is not None else 1 if r.kind is not None else 0
        key = (r.type, r.target)
        seen = best.get(key)
        if seen is None or rank > seen[0]:
            best[key] = (rank, [r])
        elif rank == seen[0]:
            seen[1].append(r)
    return [r for _, group in best.values() for r in group if r.enabled]


def rule_problems(rule: Mapping[str, Any]) -> list[dict[str, str]]:
    """What is wrong with a rule (API field names), as 422 details; empty when it is valid."""
    out: list[dict[str, str]] = []

    def bad(name: str, message: str) -> None:
        out.append({"field": name, "message": message})

    spec = TYPES.get(rule.get("type") or "")
    if spec is None:
        bad("type", f"one of {', '.join(TYPES)}")
        return out
    device_id, kind, target = rule.get("deviceId"), rule.get("kind"), rule.get("target")
    if device_id is not None and not topics.DEVICE_ID.match(device_id):
        bad("deviceId", "must match [A-Za-z0-9_.:-]{1,64}")
    if spec.kind is not None and kind not in (None, spec.kind):
        bad("kind", f"{rule['type']} applies to {spec.kind} devices")
    if spec.targets and target not in spec.targets:
        bad("target", f"{rule['type']} needs one of {', '.join(spec.targets)}")
    if not spec.targets and target is not None:
        bad("target", f"{rule['type']} takes no target")
    if rule.get("severity") not in SEVERITIES:
        bad("severity", f"one of {', '.join(SEVERITIES)}")
    low, high = rule.get("thresholdLow"), rule.get("thresholdHigh")
    clear_low, clear_high = rule.get("clearLow"), rule.get("clearHigh")
    if not spec.numeric:
        for name in ("thresholdLow", "thresholdHigh", "clearLow", "clearHigh"):
            if rule.get(name) is not None:
                bad(name, f"{rule['type']} is a flag and takes no thresholds")
        return out
    if low is None and high is None:
        bad("thresholdLow", "a band rule needs thresholdLow, thresholdHigh or both")
    if low is not None and high is not None and not low < high:
        bad("thresholdHigh", "must be above thresholdLow")
    if clear_low is not None and (low is None or clear_low < low):
        bad("clearLow", "needs thresholdLow and must not be below it")
    if clear_high is not None and (high is None or clear_high > high):
        bad("clearHigh", "needs thresholdHigh and must not be above it")
    lo = clear_low if clear_low is not None else low
    hi = clear_high if clear_high is not None else high
    if lo is not None and hi is not None and lo > hi:
        bad("clearHigh", "the clear band is empty")
    return out


# ---- what the stored records show (pure) --------------------------------------------------------


class Observation(NamedTuple):  # a tuple: thousands are made per batch
    device_id: str
    kind: str
    type: str
    target: str | None
    ts: datetime
    value: Value
    detail: str = ""  # for the message: what exactly was seen


def pump_observations(rec: PumpStatus) -> list[Observation]:
    s, d, ts = rec.status, rec.device_id, rec.ts
    out: list[Observation] = []
    for name, tank in (("ground_tank", s.ground_tank), ("roof_tank", s.roof_tank)):
        connected, working = tank.connected, tank.sensor_working
        broken = connected is False or working is False
        if connected is not None or working is not None:
            detail = "" if not broken else "disconnected" if working is not False else "not working"
            if connected is False and working is False:
                detail = "disconnected and not working"
            out.append(Observation(d, "pump", "sensor_offline", name, ts, broken, detail))
        # a level from a sensor that is off is no level: leave low water as it was
        if tank.level_percent is not None and not broken:
            out.append(Observation(d, "pump", "low_water", name, ts, (tank.level_percent,)))
    p = s.pump
    if p.protection_active is not None or p.overcurrent_protection is not None or p.overtime_protection is not None:
        on = [
            name
            for name, flag in (
                ("protection active", p.protection_active),
                ("overcurrent protection", p.overcurrent_protection),
                ("overtime protection", p.overtime_protection),
            )
            if flag
        ]
        out.append(Observation(d, "pump", "pump_protection", None, ts, bool(on), ", ".join(on)))
    if p.current_amps is not None:
        out.append(Observation(d, "pump", "overcurrent", None, ts, (p.current_amps,)))
    if not p.running:
        out.append(Observation(d, "pump", "pump_overtime", None, ts, (0.0,)))
    elif p.runtime_minutes is not None:
        out.append(Observation(d, "pump", "pump_overtime", None, ts, (p.runtime_minutes,)))
    return out


_VOLTAGE, _FREQUENCY = "voltage_out_of_range", "frequency_out_of_range"


def obis_observations(recs: Sequence[ObisReading]) -> list[Observation]:
    """Phase voltages and frequency of one OBIS message; the three phases count as one value set."""
    volts: dict[tuple[str, datetime], list[float]] = defaultdict(list)
    hertz: dict[tuple[str, datetime], list[float]] = defaultdict(list)
    for r in recs:
        cde = ".".join(r.obis_code.partition(":")[2].split(".")[:3])
        if r.obis_code.startswith("1-") and cde in OBIS_VOLTAGE:
            volts[(r.meter_id, r.ts)].append(r.value)
        elif r.obis_code.startswith("1-") and cde == OBIS_FREQUENCY:
            hertz[(r.meter_id, r.ts)].append(r.value)
    out = [Observation(m, "meter", "voltage_out_of_range", None, ts, tuple(v)) for (m, ts), v in volts.items()]
    out += [Observation(m, "meter", "frequency_out_of_range", None, ts, tuple(v)) for (m, ts), v in hertz.items()]
    return out


def vehicle_observations(rec: VehicleReading) -> list[Observation]:
    if rec.battery_temp is None:
        return []
    return [Observation(rec.vehicle_id, "vehicle", "battery_temp_high", None, rec.ts, (rec.battery_temp,))]


def status_observations(changes: Iterable[tuple[str, str, str]], now: datetime) -> list[Observation]:
    return [Observation(d, k, "device_offline", None, now, s == "offline") for d, k, s in changes]


def meter_observations(rec: MeterReading) -> list[Observation]:
    out = []
    if rec.voltage is not None:
        out.append(Observation(rec.meter_id, "meter", _VOLTAGE, None, rec.ts, (rec.voltage,)))
    if rec.frequency is not None:
        out.append(Observation(rec.meter_id, "meter", _FREQUENCY, None, rec.ts, (rec.frequency,)))
    return out


def observations(items: Iterable[Decoded], stored: Stored, quiet: Quiet | None = None) -> list[Observation]:
    """What the newly stored records show; repeats (not in `stored`) were evaluated when first stored.

    `quiet` takes the meter readings that cannot change any alert (see `Quiet`): no observation is made.
    """
    out: list[Observation] = []
    all_meters, keys = stored.all_meters, stored.keys
    for item in items:
        if not isinstance(item, Message):
            continue
        obis: list[ObisReading] = []
        for rec in item.records:
            if isinstance(rec, MeterReading):  # the usual record first, its key built inline
                if all_meters or ("meter", rec.meter_id, rec.ts) in keys:
                    if quiet is not None and quiet.hush(rec):
                        continue
                    if rec.voltage is not None:
                        out.append(Observation(rec.meter_id, "meter", _VOLTAGE, None, rec.ts, (rec.voltage,)))
                    if rec.frequency is not None:
                        out.append(Observation(rec.meter_id, "meter", _FREQUENCY, None, rec.ts, (rec.frequency,)))
                continue
            if isinstance(rec, PumpStatus | VehicleReading | ObisReading) and rec.key() not in keys:
                continue
            if isinstance(rec, PumpStatus):
                out += pump_observations(rec)
            elif isinstance(rec, VehicleReading):
                out += vehicle_observations(rec)
            elif isinstance(rec, ObisReading):
                obis.append(rec)
        if obis:
            out += obis_observations(obis)
    if quiet is not None:
        quiet.finish(out)
    return out


class Quiet:
    """Meter readings that cannot change an alert, kept out of the rule runs (most readings, every batch).

    A reading is quiet when its meter has no active alert and its voltage and frequency breach none of
    the meter's rules (`Snapshot.meter_band`): what the rules would find is "still fine". Only its time
    is kept, as the newest judged. A meter with one loud reading in the batch has all its readings run
    through the rules, in time order, the quiet ones too (`finish`).
    """

    __slots__ = ("_hushed", "_loud", "_snap", "_turned", "newest")

    def __init__(self, snap: Snapshot, loud: set[str]) -> None:
        self._snap = snap
        self._loud = loud  # meters with an active alert, and those with a loud reading in this batch
        self.newest: dict[str, datetime] = {}  # quiet meters -> their newest reading of the batch
        self._hushed: list[MeterReading] = []
        self._turned: set[str] = set()

    def hush(self, rec: MeterReading) -> bool:
        meter_id = rec.meter_id
        if meter_id in self._loud:
            return False
        v_lo, v_hi, f_lo, f_hi = self._snap.meter_band(meter_id)
        v, f = rec.voltage, rec.frequency
        if (v is None or v_lo <= v <= v_hi) and (f is None or f_lo <= f <= f_hi):
            newest = self.newest.get(meter_id)
            if newest is None or rec.ts > newest:
                self.newest[meter_id] = rec.ts
            self._hushed.append(rec)
            return True
        self._loud.add(meter_id)
        if meter_id in self.newest:
            self._turned.add(meter_id)
        return False

    def finish(self, out: list[Observation]) -> None:
        """The quiet readings of meters that turned loud later in the batch: observed after all."""
        if not self._turned:
            return
        for rec in self._hushed:
            if rec.meter_id in self._turned:
                out += meter_observations(rec)
        for meter_id in self._turned:
            del self.newest[meter_id]
        self._turned = set()


def _ts(o: Observation) -> datetime:
    return o.ts


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "?"
    return f"{value:g} {unit}".rstrip() if unit != "%" else f"{value:g} %"


def raise_message(rule: Rule, obs: Observation) -> str:
    spec = TYPES[rule.type]
    where = obs.target.replace("_", " ") + " " if obs.target else ""
    if rule.type == "device_offline":
        return f"{obs.kind} {obs.device_id} went offline"
    if not spec.numeric:
        return f"{where}{spec.label}: {obs.detail or 'active'}"
    worst = rule.worst(obs.value)
    if rule.low is not None and worst is not None and worst < rule.low:
        return f"{where}{spec.label} {_fmt(worst, spec.unit)} below {_fmt(rule.low, spec.unit)}"
    return f"{where}{spec.label} {_fmt(worst, spec.unit)} above {_fmt(rule.high, spec.unit)}"


def clear_message(rule: Rule, obs: Observation | None) -> str:
    spec = TYPES[rule.type]
    if obs is None:
        return "rule removed, disabled or overridden"
    where = obs.target.replace("_", " ") + " " if obs.target else ""
    if rule.type == "device_offline":
        return f"{obs.kind} {obs.device_id} is back online"
    if not spec.numeric:
        return f"{where}{spec.label}: back to normal"
    return f"{where}{spec.label} back to {_fmt(rule.worst(obs.value), spec.unit)}"


# ---- the engine ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Active:
    alert_id: int
    kind: str | None


@dataclass
class Snapshot:
    rules: list[Rule] = field(default_factory=list)
    device_max: dict[str, float] = field(default_factory=dict)
    correlated_meters: frozenset[str] = frozenset()
    active: dict[Key, Active] = field(default_factory=dict)
    notified: int = 0  # NOTIFYs seen when it was loaded
    _for: dict[tuple[str, str], dict[tuple[str, str | None], list[Rule]]] = field(default_factory=dict)
    _bands: dict[str, tuple[float, float, float, float]] = field(default_factory=dict)

    def rules_for(self, device_id: str, kind: str) -> dict[tuple[str, str | None], list[Rule]]:
        """The device's enabled rules by (type, target), its own maximum applied; cached per snapshot."""
        key = (device_id, kind)
        found = self._for.get(key)
        if found is None:
            found = {}
            for r in applicable(self.rules, device_id, kind):
                found.setdefault((r.type, r.target), []).append(with_device_max(r, self.device_max.get(device_id)))
            if len(self._for) > 100_000:
                self._for.clear()
            self._for[key] = found
        return found

    def meter_band(self, device_id: str) -> tuple[float, float, float, float]:
        """(voltage low, high, frequency low, high): inside, a meter reading breaches none of its rules."""
        band = self._bands.get(device_id)
        if band is None:
            rules = self.rules_for(device_id, "meter")
            volts, hertz = rules.get((_VOLTAGE, None), ()), rules.get((_FREQUENCY, None), ())
            band = (*_band(volts), *_band(hertz))
            if len(self._bands) > 100_000:
                self._bands.clear()
            self._bands[device_id] = band
        return band

    def evaluates(self, type_: str) -> bool:
        return any(r.enabled and r.type == type_ for r in self.rules)


def _band(rules: Iterable[Rule]) -> tuple[float, float]:
    """The values no rule's band is breached by (a NaN is outside every band: it goes the long way)."""
    lows = [r.low for r in rules if r.low is not None]
    highs = [r.high for r in rules if r.high is not None]
    return (max(lows, default=-math.inf), min(highs, default=math.inf))


@dataclass
class Episode:
    """One alert of this batch: raised here (resolved here too, or still active) or raised before."""

    device_id: str
    kind: str
    rule: Rule
    raised: Observation | None  # None: it was already active before this batch
    resolved: Observation | None = None
    resolved_at: datetime | None = None
    message: str = ""
    note: str = ""


@dataclass
class _Staged:
    snapshot: Snapshot
    active: dict[Key, Active | None] = field(default_factory=dict)  # over snapshot.active
    seen: dict[str, datetime] = field(default_factory=dict)  # device -> newest record time judged
    reloaded: bool = False
    conn: Any = None

    def active_devices(self) -> set[str]:
        out = {device_id for device_id, _ in self.snapshot.active}
        out.update(device_id for (device_id, _), ref in self.active.items() if ref is not None)
        return out

    def is_active(self, key: Key) -> bool:
        if key in self.active:
            return self.active[key] is not None
        return key in self.snapshot.active


class _Publisher(Protocol):
    def publish(self, topic: str, payload: bytes, qos: int = 0) -> None: ...


_RULES = (
    "SELECT id, type, device_id, kind, target, threshold_low, threshold_high, clear_low, clear_high, severity, "
    "enabled FROM alert_rules ORDER BY id"
)
_DEVICE_MAX = """
    SELECT device_id, (meta->>'pump_max_current')::float8 FROM devices
    WHERE jsonb_typeof(meta->'pump_max_current') = 'number'
       OR meta->>'pump_max_current' ~ '^[0-9]+(\\.[0-9]+)?$'
"""
_ACTIVE = "SELECT device_id, rule_id, id, kind FROM alerts WHERE state = 'active'"
# The sums of vehicle_efficiency_24h, per vehicle: the view's own filter would not reach inside its FULL
# JOIN (it would sum every vehicle's day on each batch); LATERAL keeps each sum on one device's index.
_EFFICIENCY = """
    SELECT v.vehicle_id, ac.kwh_ac, dc.kwh_dc, dc.record_count
    FROM (SELECT unnest(%(vehicles)s::text[])
          UNION SELECT vehicle_id FROM meter_vehicle_correlations WHERE meter_id = ANY(%(meters)s::text[]))
         AS v(vehicle_id)
    CROSS JOIN LATERAL (
        SELECT sum(e.kwh_dc) AS kwh_dc, coalesce(sum(e.record_count), 0) AS record_count
        FROM vehicle_energy_1h e
        WHERE e.vehicle_id = v.vehicle_id AND e.bucket >= date_trunc('hour', now()) - INTERVAL '23 hours') dc
    CROSS JOIN LATERAL (
        SELECT sum(m.kwh) AS kwh_ac
        FROM meter_vehicle_correlations c
        CROSS JOIN LATERAL (
            SELECT sum(x.kwh) AS kwh FROM meter_energy_1h x
            WHERE x.meter_id = c.meter_id AND x.bucket >= date_trunc('hour', now()) - INTERVAL '23 hours') m
        WHERE c.vehicle_id = v.vehicle_id) ac
"""
_RESOLVE = """
WITH v AS (SELECT * FROM unnest(%s::text[], %s::bigint[], %s::timestamptz[], %s::float8[], %s::text[])
           AS v(device_id, rule_id, ts, value, note)),
done AS (
    UPDATE alerts a SET state = 'resolved', resolved_at = v.ts, resolved_value = v.value
    FROM v WHERE a.device_id = v.device_id AND a.rule_id = v.rule_id AND a.state = 'active'
    RETURNING a.id, a.device_id, a.kind, a.rule_id, a.type, a.severity, a.value, a.resolved_value, a.message,
              a.raised_at, a.resolved_at, v.note),
ev AS (
    INSERT INTO alert_events (alert_id, device_id, kind, rule_id, type, severity, event, ts, value, message)
    SELECT id, device_id, kind, rule_id, type, severity, 'resolved', resolved_at, resolved_value, note FROM done)
SELECT id, device_id, kind, rule_id, type, severity, value, resolved_value, message, raised_at, resolved_at, note
FROM done
"""
_RAISE = """
WITH v AS (SELECT * FROM unnest(%s::text[], %s::text[], %s::bigint[], %s::text[], %s::text[], %s::float8[],
                                %s::text[], %s::timestamptz[], %s::timestamptz[], %s::float8[], %s::text[])
           AS v(device_id, kind, rule_id, type, severity, value, message, raised_at, resolved_at, resolved_value,
                note)),
ins AS (
    INSERT INTO alerts (device_id, kind, rule_id, type, severity, state, value, message, raised_at, resolved_at,
                        resolved_value)
    SELECT device_id, kind, rule_id, type, severity,
           CASE WHEN resolved_at IS NULL THEN 'active' ELSE 'resolved' END,
           value, message, raised_at, resolved_at, resolved_value
    FROM v
    ON CONFLICT (device_id, rule_id) WHERE state = 'active' DO NOTHING
    RETURNING id, device_id, kind, rule_id, type, severity, value, resolved_value, message, raised_at, resolved_at),
out AS (
    SELECT ins.*, v.note FROM ins
    JOIN v ON v.device_id = ins.device_id AND v.rule_id = ins.rule_id AND v.raised_at = ins.raised_at),
ev AS (
    INSERT INTO alert_events (alert_id, device_id, kind, rule_id, type, severity, event, ts, value, message)
    SELECT id, device_id, kind, rule_id, type, severity, 'raised', raised_at, value, message FROM out
    UNION ALL
    SELECT id, device_id, kind, rule_id, type, severity, 'resolved', resolved_at, resolved_value, note
    FROM out WHERE resolved_at IS NOT NULL)
SELECT id, device_id, kind, rule_id, type, severity, value, resolved_value, message, raised_at, resolved_at, note
FROM out
"""


def _events(row: Sequence[Any], raised: bool) -> list[dict[str, Any]]:
    """The announcement(s) of one written alert row: its raise and/or its resolve, in the contract's names."""
    (
        alert_id,
        device_id,
        kind,
        rule_id,
        type_,
        severity,
        value,
        resolved_value,
        message,
        raised_at,
        resolved_at,
        note,
    ) = row
    base = {
        "id": alert_id,
        "deviceId": device_id,
        "kind": kind,
        "ruleId": rule_id,
        "type": type_,
        "severity": severity,
        "message": message,
        "value": value,
        "raisedAt": raised_at,
    }
    out = []
    if raised:
        out.append({**base, "event": "raised", "state": "active", "resolvedAt": None, "timestamp": raised_at})
    if resolved_at is not None:
        out.append(
            {
                **base,
                "event": "resolved",
                "state": "resolved",
                "resolvedAt": resolved_at,
                "resolvedValue": resolved_value,
                "note": note,
                "timestamp": resolved_at,
            }
        )
    return out


class AlertEngine:
    """Evaluates batches inside the writer's transaction; `commit()` once that transaction committed.

    `shared=True` (several bridges on a shared subscription) re-reads the active alerts of the devices
    in each batch instead of trusting the cache.
    """

    def __init__(self, *, shared: bool = False, reload_every: float = RELOAD_EVERY) -> None:
        self._shared = shared
        self._reload_every = reload_every
        self._snap: Snapshot | None = None
        self._next_reload = 0.0
        self._notified = 0
        self._conn: Any = None  # the connection that LISTENs
        self._listening: weakref.WeakSet[Any] = weakref.WeakSet()
        self._seen: dict[str, datetime] = {}
        self._staged: _Staged | None = None

    # -- the two entry points, both inside a transaction on `cur` ----------------------------------

    async def evaluate(
        self,
        cur: psycopg.AsyncCursor[Any],
        items: Sequence[Decoded],
        stored: Stored,
        status_changes: Sequence[tuple[str, str, str]],
        asked: tuple[psycopg.AsyncCursor[Any], set[str]] | None = None,
    ) -> list[dict[str, Any]]:
        """Raise and resolve what the batch just stored shows; returns the announcements.

        `asked`: a cursor and the devices whose active alerts `ask_active` asked it for."""
        staged = await self._begin(cur)
        now = datetime.now(UTC)
        loaded: set[str] = set()
        if self._shared:
            # with a shared subscription another bridge may have raised what a quiet reading would
            # resolve: the batch's devices' active alerts are read first, then quiet is judged on them
            loaded = {item.device_id for item in items if item.device_id is not None}
            if asked is not None:
                await self._read_active(*asked, staged)
            await self._load_active(cur, staged, loaded - asked[1] if asked else loaded)
        quiet = Quiet(staged.snapshot, staged.active_devices())
        found = observations(items, stored, quiet) + status_observations(status_changes, now)
        efficiency = await self._efficiency(cur, staged, items, stored, now)
        found += efficiency
        if self._shared:
            await self._load_active(cur, staged, {o.device_id for o in found} - loaded)
        elif efficiency:
            # a vehicle's efficiency is judged by whichever writer (BRIDGE_WRITERS) stored its meter's or its
            # own data, and each writer caches only what it raised or resolved itself: ask the database
            await self._load_active(cur, staged, {o.device_id for o in efficiency})
        return await self._apply(cur, staged, found, now, quiet)

    async def sweep(
        self, cur: psycopg.AsyncCursor[Any], status_changes: Sequence[tuple[str, str, str]]
    ) -> list[dict[str, Any]]:
        """The offline sweep's devices; also keeps rules fresh (and resolves orphans) while no data arrives."""
        staged = await self._begin(cur)
        now = datetime.now(UTC)
        found = status_observations(status_changes, now)
        if self._shared and found:
            await self._load_active(cur, staged, {o.device_id for o in found})
        return await self._apply(cur, staged, found, now)

    def commit(self) -> None:
        """The transaction of the last evaluate/sweep committed: its state becomes the engine's."""
        staged, self._staged = self._staged, None
        if staged is None:
            return
        snap = staged.snapshot
        for key, ref in staged.active.items():
            if ref is None:
                snap.active.pop(key, None)
            else:
                snap.active[key] = ref
        self._snap = snap
        self._seen.update(staged.seen)
        if staged.reloaded:
            self._next_reload = time.monotonic() + self._reload_every
        if staged.conn is not None:
            self._conn = staged.conn
            # LISTEN took effect only now: a rule committed since our read sent its NOTIFY before it
            self._next_reload = 0.0

    # -- internals --------------------------------------------------------------------------------

    def _on_notify(self, notify: psycopg.Notify) -> None:
        self._notified += 1

    async def _begin(self, cur: psycopg.AsyncCursor[Any]) -> _Staged:
        conn = cur.connection
        new_conn = conn is not self._conn
        stale = self._snap is None or self._snap.notified != self._notified
        due = time.monotonic() >= self._next_reload
        if not (new_conn or stale or due):
            assert self._snap is not None
            self._staged = _Staged(self._snap)
            return self._staged
        if new_conn:
            await self._listen(conn)
        notified = self._notified
        snap = await self._load(cur)
        snap.notified = notified
        self._staged = _Staged(snap, reloaded=True, conn=conn if new_conn else None)
        return self._staged

    async def _listen(self, conn: psycopg.AsyncConnection[Any]) -> None:
        if conn not in self._listening:
            conn.add_notify_handler(self._on_notify)
            self._listening.add(conn)
        try:
            async with conn.transaction():  # a savepoint: a server without LISTEN keeps the batch
                await conn.execute(f"LISTEN {RULES_CHANNEL}")
        except psycopg.OperationalError:
            raise
        except psycopg.Error as exc:
            log.warning("LISTEN %s refused (%s); rules reload every %.0f s", RULES_CHANNEL, exc, self._reload_every)

    async def _load(self, cur: psycopg.AsyncCursor[Any]) -> Snapshot:
        await cur.execute(_RULES)
        rules = [Rule(*row) for row in await cur.fetchall()]
        await cur.execute(_DEVICE_MAX)
        device_max = {d: m for d, m in await cur.fetchall()}
        await cur.execute("SELECT DISTINCT meter_id FROM meter_vehicle_correlations")
        meters = frozenset(r[0] for r in await cur.fetchall())
        await cur.execute(_ACTIVE)
        active = {(d, r): Active(i, k) for d, r, i, k in await cur.fetchall()}
        return Snapshot(rules, device_max, meters, active)

    async def _load_active(self, cur: psycopg.AsyncCursor[Any], staged: _Staged, devices: set[str]) -> None:
        if devices:
            await self.ask_active(cur, devices)
            await self._read_active(cur, devices, staged)

    @staticmethod
    async def ask_active(cur: psycopg.AsyncCursor[Any], devices: set[str]) -> None:
        """Ask for these devices' active alerts; in pipeline mode the statements after it go out before
        `evaluate(asked=…)` reads them. Shared mode: sent right after the statement that takes the meters'
        turn, so the batch's next statements run while its Python judges."""
        # a typed column: psycopg's list dumper goes element by element (a batch's devices, in shared mode)
        await cur.execute(_ACTIVE + " AND device_id = ANY(%b::text[])", (Texts(devices),))

    @staticmethod
    async def _read_active(cur: psycopg.AsyncCursor[Any], devices: set[str], staged: _Staged) -> None:
        for key in staged.snapshot.active:
            if key[0] in devices:
                staged.active[key] = None
        for d, r, i, k in await cur.fetchall():
            staged.active[(d, r)] = Active(i, k)

    async def _efficiency(
        self,
        cur: psycopg.AsyncCursor[Any],
        staged: _Staged,
        items: Sequence[Decoded],
        stored: Stored,
        now: datetime,
    ) -> list[Observation]:
        """One query for the 24-hour efficiency of the vehicles this batch concerns (directly or by meter)."""
        snap = staged.snapshot
        if not snap.evaluates("low_efficiency"):
            return []
        vehicles = stored.ids("vehicle")
        meters = stored.meter_ids() & snap.correlated_meters
        if not vehicles and not meters:
            return []
        await cur.execute(_EFFICIENCY, {"vehicles": sorted(vehicles), "meters": sorted(meters)})
        out = []
        for vehicle_id, kwh_ac, kwh_dc, count in await cur.fetchall():
            # judged only once the vehicle itself reported: AC alone is a session that just began
            if count and kwh_ac and kwh_ac > 0:
                ratio = round((kwh_dc or 0.0) / kwh_ac, 6)
                out.append(Observation(vehicle_id, "vehicle", "low_efficiency", None, now, (ratio,)))
        return out

    def _plan(
        self, staged: _Staged, found: list[Observation], now: datetime, quiet: Quiet | None = None
    ) -> list[Episode]:
        snap = staged.snapshot
        by_metric: dict[tuple[str, str, str | None], list[Observation]] = {}
        newest: dict[str, datetime] = {}
        judged, judged_before = staged.seen.get, self._seen.get
        for o in found:
            device_id = o.device_id
            if o.type not in LIVE_TYPES:
                last = judged(device_id) or judged_before(device_id)
                if last is not None and o.ts < last:
                    continue  # older than what was already judged: late history, not the present state
                known = newest.get(device_id)
                if known is None or o.ts > known:
                    newest[device_id] = o.ts
            key = (device_id, o.type, o.target)
            group = by_metric.get(key)
            if group is None:
                by_metric[key] = [o]
            else:
                group.append(o)
        staged.seen.update(newest)
        if quiet is not None:  # judged too: a late reading older than these is history
            for device_id, ts in quiet.newest.items():
                last = judged(device_id) or judged_before(device_id)
                if last is None or ts > last:
                    staged.seen[device_id] = ts
        episodes: list[Episode] = []
        for (device_id, type_, target), seen in by_metric.items():
            rules = snap.rules_for(device_id, seen[0].kind).get((type_, target))
            if not rules:
                continue
            if len(seen) > 1:
                seen.sort(key=_ts)
            for rule in rules:
                if (
                    len(seen) == 1
                    and rule.type != "device_offline"
                    and not rule.breached(seen[0].value)
                    and not staged.is_active((device_id, rule.id))
                ):
                    continue  # the usual reading: in range, nothing active, nothing to do (what _run finds)
                episodes += self._run(staged, rule, seen)
        if staged.reloaded:
            episodes += self._orphans(staged, now)
        return episodes

    def _run(self, staged: _Staged, rule: Rule, seen: list[Observation]) -> list[Episode]:
        key = (seen[0].device_id, rule.id)
        active = staged.is_active(key)
        if rule.type == "device_offline":
            # a status change is rare and already a transition of `devices`: act on it whatever the cache
            # says (another bridge may have raised or resolved it); both statements are no-ops when stale
            active = seen[0].value is False
        out: list[Episode] = []
        open_: Episode | None = None
        for o in seen:
            after = step(active, rule, o.value)
            if after == active:
                continue
            active = after
            if active:
                open_ = Episode(o.device_id, o.kind, rule, o, message=raise_message(rule, o))
            else:
                done = open_ or Episode(o.device_id, o.kind, rule, None)
                done.resolved, done.resolved_at, done.note = o, o.ts, clear_message(rule, o)
                out.append(done)
                open_ = None
        if open_ is not None:
            out.append(open_)
        return out

    def _orphans(self, staged: _Staged, now: datetime) -> list[Episode]:
        """Active alerts whose rule no longer applies (deleted, disabled, overridden): resolved now."""
        snap = staged.snapshot
        out = []
        for (device_id, rule_id), ref in list(snap.active.items()):
            if not staged.is_active((device_id, rule_id)) or ref.kind is None:
                continue
            if any(r.id == rule_id for rules in snap.rules_for(device_id, ref.kind).values() for r in rules):
                continue
            rule = next((r for r in snap.rules if r.id == rule_id), Rule(rule_id, "device_offline"))
            out.append(Episode(device_id, ref.kind, rule, None, resolved_at=now, note=clear_message(rule, None)))
        return out

    async def _apply(
        self,
        cur: psycopg.AsyncCursor[Any],
        staged: _Staged,
        found: list[Observation],
        now: datetime,
        quiet: Quiet | None = None,
    ) -> list[dict[str, Any]]:
        episodes = self._plan(staged, found, now, quiet)
        if not episodes:
            return []
        announced: list[dict[str, Any]] = []
        resolve = [e for e in episodes if e.raised is None]
        raise_ = [e for e in episodes if e.raised is not None]
        # resolve first, in its own statement: a new alert of the same (device, rule) in this batch
        # must not meet the old one still active in the unique index
        if resolve:
            await cur.execute(
                _RESOLVE,
                (
                    [e.device_id for e in resolve],
                    [e.rule.id for e in resolve],
                    [e.resolved_at for e in resolve],
                    [e.rule.worst(e.resolved.value) if e.resolved else None for e in resolve],
                    [e.note for e in resolve],
                ),
            )
            for row in await cur.fetchall():
                staged.active[(row[1], row[3])] = None
                announced += _events(row, raised=False)
            for e in resolve:
                staged.active[(e.device_id, e.rule.id)] = None
        if raise_:
            await cur.execute(
                _RAISE,
                (
                    [e.device_id for e in raise_],
                    [e.kind for e in raise_],
                    [e.rule.id for e in raise_],
                    [e.rule.type for e in raise_],
                    [e.rule.severity for e in raise_],
                    [e.rule.worst(e.raised.value) if e.raised else None for e in raise_],
                    [e.message for e in raise_],
                    [e.raised.ts if e.raised else now for e in raise_],
                    [e.resolved_at for e in raise_],
                    [e.rule.worst(e.resolved.value) if e.resolved else None for e in raise_],
                    [e.note or None for e in raise_],
                ),
            )
            written = set()
            for row in await cur.fetchall():
                written.add((row[1], row[3]))
                if row[10] is None:
                    staged.active[(row[1], row[3])] = Active(row[0], row[2])
                announced += _events(row, raised=True)
            for e in raise_:
                key = (e.device_id, e.rule.id)
                if e.resolved is None and key not in written:
                    # it met an alert of this (device, rule) that is active already (another writer's)
                    staged.active[key] = staged.snapshot.active.get(key) or Active(0, e.kind)
        announced.sort(key=lambda a: a["timestamp"])
        return announced


# ---- after the commit ---------------------------------------------------------------------------


def publish(client: _Publisher, alerts: Sequence[dict[str, Any]]) -> None:
    """Each raised or resolved alert on `alerts/{deviceId}` (QoS 1); the database already holds it."""
    for alert in alerts:
        client.publish(topics.alert_topic(alert["deviceId"]), orjson.dumps(alert), qos=1)
