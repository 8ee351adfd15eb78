"""Device messages: the validation models (shared with the API) and decoding into records.

Decoding is synchronous and allocation-light on purpose: it runs inside paho's network thread for
every message, so it must not touch asyncio or the database.
"""

from __future__ import annotations

import re
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo
from typing import TYPE_CHECKING, Annotated, Any, Literal, NamedTuple

import orjson
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, model_validator

from . import topics
from .errors import PayloadError

if TYPE_CHECKING:
    from .adapters import Adapters

Finite = Annotated[float, Field(allow_inf_nan=False)]
Timestamp = int | float | str | None
OBIS_CODE = re.compile(r"^\d{1,3}-\d{1,3}:\d{1,3}\.\d{1,3}\.\d{1,3}(\.\d{1,3})?$")
# Below this an epoch-ms value is 1973 or earlier: an ESP32 sends millis() (uptime) there, not a time.
_UPTIME_LIMIT_MS = 1e11
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Documents nest 4 levels at most; orjson parses 1024 levels but writes only 254, and the writer and
# the committed notes write payloads back out with it, so deeper ones are refused when read.
MAX_DEPTH = 64


def _alias(*names: str) -> Any:
    return Field(default=None, validation_alias=AliasChoices(*names))


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True, strict=True, frozen=True)


class MeterReadingIn(_Model):
    """A meter reading with the field names of EMS (`deviceId`, `totalPowerKw`) and EIE (`meterId`, …)."""

    meterId: str | None = _alias("meterId", "deviceId", "meter_id", "device_id")
    totalPowerKw: Annotated[Finite, Field(ge=-1e6, le=1e6)] | None = _alias(
        "totalPowerKw", "powerKw", "total_power_kw", "power_kw"
    )
    kwhConsumedAc: Annotated[Finite, Field(ge=0, le=1e6)] | None = _alias(
        "kwhConsumedAc", "kwh_consumed_ac", "kwhConsumed"
    )
    energyTotalKwh: Annotated[Finite, Field(ge=0, le=1e12)] | None = _alias(
        "energyTotalKwh", "energy_total_kwh", "totalEnergyKwh"
    )
    voltage: Annotated[Finite, Field(ge=0, le=1e6)] | None = None
    current: Annotated[Finite, Field(ge=-1e5, le=1e5)] | None = None
    frequency: Annotated[Finite, Field(ge=0, le=1000)] | None = None
    powerFactor: Annotated[Finite, Field(ge=-1, le=1)] | None = _alias("powerFactor", "power_factor")
    timestamp: Timestamp = None

    @model_validator(mode="after")
    def _has_measurement(self) -> MeterReadingIn:
        if (
            self.totalPowerKw is None
            and self.kwhConsumedAc is None
            and self.energyTotalKwh is None
            and self.voltage is None
            and self.current is None
            and self.frequency is None
            and self.powerFactor is None
        ):
            raise ValueError("a meter reading needs at least one measurement")
        return self


def _float_bounds(model: type[BaseModel]) -> dict[str, tuple[float, float]]:
    """Each bounded float field's (ge, le), read from the model itself: one place says what is valid."""
    out: dict[str, tuple[float, float]] = {}
    for name, info in model.model_fields.items():
        lo, hi = -float("inf"), float("inf")
        bounded = False
        for arg in typing.get_args(info.annotation):
            for meta in getattr(arg, "__metadata__", ()):
                for m in getattr(meta, "metadata", ()):
                    if hasattr(m, "ge"):
                        lo, bounded = float(m.ge), True
                    if hasattr(m, "le"):
                        hi, bounded = float(m.le), True
        if bounded:
            out[name] = (lo, hi)
    return out


_METER_BOUNDS = _float_bounds(MeterReadingIn)  # in MeterReading's order
_METER_KEYS = frozenset(_METER_BOUNDS) | {"meterId", "timestamp"}


def plain_meter_reading(data: dict[str, Any]) -> tuple[str | None, Timestamp, list[float | None]] | None:
    """The usual meter payload checked without pydantic (~5x faster): contract field names only, floats
    within the model's bounds. Anything else returns None and goes to `MeterReadingIn`, which accepts
    or explains it; what this accepts, the model accepts with the same values."""
    if not data.keys() <= _METER_KEYS:
        return None
    values: list[float | None] = []
    measured = False
    for name, (lo, hi) in _METER_BOUNDS.items():
        v = data.get(name)
        if v is not None:
            if type(v) is not float or not lo <= v <= hi:  # NaN fails the comparison too
                return None
            measured = True
        values.append(v)
    meter_id, ts = data.get("meterId"), data.get("timestamp")
    if not measured or (meter_id is not None and type(meter_id) is not str):
        return None
    if ts is not None and type(ts) not in (str, int, float):
        return None
    return meter_id, ts, values


class VehicleReadingIn(_Model):
    vehicleId: str | None = _alias("vehicleId", "deviceId", "vehicle_id", "device_id")
    soc: Annotated[Finite, Field(ge=0, le=100)] | None = None
    kwhDeliveredDc: Annotated[Finite, Field(ge=0, le=1e6)] | None = _alias("kwhDeliveredDc", "kwh_delivered_dc")
    batteryTemp: Annotated[Finite, Field(ge=-60, le=150)] | None = _alias("batteryTemp", "battery_temp")
    timestamp: Timestamp = None

    @model_validator(mode="after")
    def _has_measurement(self) -> VehicleReadingIn:
        if self.soc is None and self.kwhDeliveredDc is None and self.batteryTemp is None:
            raise ValueError("a vehicle reading needs soc, kwhDeliveredDc or batteryTemp")
        return self


class ObisValueIn(_Model):
    obisCode: Annotated[str, Field(pattern=OBIS_CODE.pattern)] = Field(
        validation_alias=AliasChoices("obisCode", "obis_code", "code")
    )
    value: Finite
    unit: Annotated[str, Field(max_length=32)] | None = None
    scaler: Annotated[int, Field(ge=-12, le=12)] = 0
    quality: Annotated[str, Field(max_length=32)] | None = None


class ObisReadingsIn(_Model):
    meterId: str | None = _alias("meterId", "deviceId", "meter_id", "device_id")
    readings: Annotated[list[ObisValueIn], Field(min_length=1, max_length=1000)]
    timestamp: Timestamp = None

    @classmethod
    def from_payload(cls, data: dict[str, Any]) -> ObisReadingsIn:
        """Accept HES's flat form `{"1-0:1.8.0.255": 12345, …}` as well as the `readings` list."""
        if "readings" in data:
            return cls.model_validate(data)
        flat = [{"obisCode": k, "value": v} for k, v in data.items() if OBIS_CODE.match(k)]
        rest = {k: v for k, v in data.items() if not OBIS_CODE.match(k)}
        return cls.model_validate({**rest, "readings": flat})


class TankIn(_Model):
    level_percent: Annotated[Finite, Field(ge=0, le=100)] | None = None
    level_inches: Annotated[Finite, Field(ge=0, le=10000)] | None = None
    alarm_active: bool | None = None
    connected: bool | None = None
    sensor_working: bool | None = None
    water_supply_on: bool | None = None


class PumpIn(_Model):
    running: bool
    manual_override: bool | None = None
    current_amps: Annotated[Finite, Field(ge=0, le=1000)] | None = None
    power_watts: Annotated[Finite, Field(ge=0, le=1e6)] | None = None
    daily_consumption: Annotated[Finite, Field(ge=0)] | None = None
    hourly_consumption: Annotated[Finite, Field(ge=0)] | None = None
    runtime_minutes: Annotated[Finite, Field(ge=0)] | None = None
    total_runtime_hours: Annotated[Finite, Field(ge=0)] | None = None
    protection_active: bool | None = None
    overcurrent_protection: bool | None = None
    overtime_protection: bool | None = None


class SystemIn(_Model):
    auto_mode_enabled: bool | None = None
    manual_pump_control: bool | None = None
    water_supply_active: bool | None = None


class PumpStatusIn(_Model):
    """The PUMP controller's status document (its README's `Device Status Update Example`)."""

    device_id: str | None = _alias("device_id", "deviceId")
    timestamp: Timestamp = None
    ground_tank: TankIn
    roof_tank: TankIn
    pump: PumpIn
    system: SystemIn | None = None


class PumpEventIn(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True, strict=True, frozen=True)
    device_id: str | None = _alias("device_id", "deviceId")
    event: Annotated[str, Field(min_length=1, max_length=64)] = Field(
        validation_alias=AliasChoices("event", "event_type", "type")
    )
    timestamp: Timestamp = None


class PresenceIn(_Model):
    online: bool


class CommandResultIn(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, frozen=True)
    commandId: Annotated[str, Field(min_length=1, max_length=128)]
    status: Literal["ok", "error"]
    message: str | None = None
    data: Any = None


# ---- records: what the writer stores ---------------------------------------------------------


class MeterReading(NamedTuple):  # a tuple: one per message, and a frozen dataclass costs 3x to build
    meter_id: str
    ts: datetime
    power_kw: float | None
    kwh_consumed_ac: float | None
    energy_total_kwh: float | None
    voltage: float | None
    current: float | None
    frequency: float | None
    power_factor: float | None

    def key(self) -> tuple[str, str, datetime]:
        return ("meter", self.meter_id, self.ts)


@dataclass(frozen=True, slots=True)
class ObisReading:
    meter_id: str
    ts: datetime
    obis_code: str
    value: float
    raw_value: float
    scaler: int
    unit: str | None
    quality: str | None

    def key(self) -> tuple[str, str, datetime]:
        return ("obis", self.meter_id, self.ts)


class VehicleReading(NamedTuple):  # a tuple, as MeterReading
    vehicle_id: str
    ts: datetime
    soc: float | None
    kwh_delivered_dc: float | None
    battery_temp: float | None

    def key(self) -> tuple[str, str, datetime]:
        return ("vehicle", self.vehicle_id, self.ts)


@dataclass(frozen=True, slots=True)
class PumpStatus:
    device_id: str
    ts: datetime
    status: PumpStatusIn

    def key(self) -> tuple[str, str, datetime]:
        return ("pump", self.device_id, self.ts)


@dataclass(frozen=True, slots=True)
class PumpEvent:
    device_id: str
    ts: datetime
    event: str
    payload: dict[str, Any]

    def key(self) -> tuple[str, str, datetime]:
        return ("event", self.device_id, self.ts)


@dataclass(frozen=True, slots=True)
class Presence:
    kind: topics.Kind
    device_id: str
    online: bool


@dataclass(frozen=True, slots=True)
class CommandResult:
    device_id: str
    command_id: str
    ok: bool
    payload: dict[str, Any]
    # answers that carry no command id (adapted firmwares): the newest pending command of the device
    # whose stored payload contains this document is the one answered (see bridge.adapters)
    match: dict[str, Any] | None = None


Record = MeterReading | ObisReading | VehicleReading | PumpStatus | PumpEvent | Presence | CommandResult


@dataclass(slots=True)
class Message:
    """One MQTT message decoded: the device it came from and the records it yields."""

    kind: topics.Kind
    device_id: str
    received_at: datetime
    records: list[Record]
    topic: str = ""
    payload: bytes = b""
    mid: int = 0
    generation: int = 0
    # an adapted device's command address (bridge.adapters), kept in `devices.meta.adapter`
    address: dict[str, Any] | None = None


@dataclass(slots=True)
class DeadLetter:
    topic: str
    payload: bytes
    reason: str
    received_at: datetime
    mid: int = 0
    generation: int = 0
    device_id: str | None = None
    kind: str | None = field(default=None)


Decoded = Message | DeadLetter

Key = tuple[str, str, datetime]  # (record kind, device, time): a stored row's primary key


class Stored:
    """What a batch stored for the first time (a repeat's rows were already there).

    `keys`: the keys the INSERTs returned. The usual batch stores every meter reading it carries; then
    `all_meters` says so and their keys are never fetched (thousands of rows and hashed datetimes).
    """

    __slots__ = ("_meter_ids", "_meters", "all_meters", "keys")

    def __init__(
        self, keys: set[Key] | None = None, *, all_meters: bool = False, meters: Sequence[MeterReading] = ()
    ) -> None:
        self.keys: set[Key] = keys if keys is not None else set()
        self.all_meters = all_meters
        self._meters = meters
        self._meter_ids: set[str] | None = None

    def meter(self, meter_id: str, ts: datetime) -> bool:
        return self.all_meters or ("meter", meter_id, ts) in self.keys

    def meter_ids(self) -> set[str]:
        """The meters with a reading stored by this batch."""
        if self._meter_ids is None:
            if self.all_meters:
                self._meter_ids = {r.meter_id for r in self._meters}
            else:
                self._meter_ids = {k[1] for k in self.keys if k[0] == "meter"}
        return self._meter_ids

    def ids(self, kind: str) -> set[str]:
        """The devices of `kind` with a row stored by this batch."""
        if kind == "meter":
            return self.meter_ids()
        return {k[1] for k in self.keys if k[0] == kind}


# ---- decoding -------------------------------------------------------------------------------


def explain(exc: ValidationError) -> list[dict[str, object]]:
    """Every field error of a pydantic failure, as `{"field", "message"}`."""
    out: list[dict[str, object]] = []
    for err in exc.errors(include_url=False, include_context=False, include_input=False):
        loc = ".".join(str(p) for p in err["loc"]) or "(body)"
        out.append({"field": loc, "message": err["msg"], "type": err["type"]})
    return out


def _reason(errors: list[dict[str, object]]) -> str:
    return "invalid payload: " + "; ".join(f"{e['field']}: {e['message']}" for e in errors)


def to_datetime(value: Timestamp, *, tz: tzinfo, received_at: datetime, max_future: float) -> datetime:
    """Epoch ms or ISO-8601 (naive ISO read in the site zone); absent means when we received it."""
    if value is None:
        return received_at
    # str.isdigit() is true for "²" and other non-ASCII digits that int() refuses; and int() refuses
    # more than 4300 digits, while 20 already put an epoch-ms value past any datetime
    if isinstance(value, str) and value.isascii() and value.isdigit():
        if len(value) > 20:
            raise PayloadError(f"invalid payload: timestamp: {value[:24]}… ({len(value)} digits) is out of range")
        value = int(value)
    if isinstance(value, bool):
        raise PayloadError("invalid payload: timestamp: must be epoch milliseconds or ISO-8601")
    if isinstance(value, int | float):
        if value != value or value in (float("inf"), float("-inf")):
            raise PayloadError("invalid payload: timestamp: not a finite number")
        if value < _UPTIME_LIMIT_MS:
            return received_at
        try:
            ts = _EPOCH + timedelta(milliseconds=value)
        except OverflowError as exc:
            raise PayloadError(f"invalid payload: timestamp: {value} is out of range") from exc
    else:
        try:
            ts = datetime.fromisoformat(value)
        except ValueError as exc:
            raise PayloadError(f"invalid payload: timestamp: {value!r} is not ISO-8601") from exc
        if ts.tzinfo is None:
            ts = ts.replace(tzinfo=tz)
        if ts.year < 1990:
            raise PayloadError(f"invalid payload: timestamp: {value!r} is before 1990")
    if (ts - received_at).total_seconds() > max_future:
        raise PayloadError(
            f"invalid payload: timestamp: {ts.isoformat()} is more than {max_future:.0f} s in the future"
        )
    return ts


def _check_id(payload_id: str | None, topic_id: str) -> None:
    if payload_id is not None and payload_id != topic_id:
        raise PayloadError(f"device id {payload_id!r} in the payload differs from {topic_id!r} in the topic")


@dataclass(frozen=True, slots=True)
class Decoder:
    """Turns (topic, payload) into a Message or a DeadLetter; never raises for bad input."""

    tz: tzinfo
    max_future: float = 600.0
    max_bytes: int = 64 * 1024
    adapters: Adapters | None = None  # firmwares taken as they are, on their own topic prefixes

    def decode(self, topic: str, payload: bytes, received_at: datetime, retained: bool = False) -> Decoded | None:
        """`retained`: the broker replayed a kept message on our subscription (adapted devices care)."""
        if self.adapters is not None and topic.partition("/")[0] not in topics.PREFIX_TO_KIND:
            adapter = self.adapters.owner(topic)
            if adapter is not None:
                return adapter.decode(topic, payload, received_at, retained)
        try:
            where = topics.parse(topic)
        except topics.TopicError as exc:
            return DeadLetter(topic, payload, str(exc), received_at)
        if where.channel == "cmd":
            return None  # our own command to the device, echoed because we subscribe to the prefix
        try:
            records = self.records(where, payload, received_at)
        except PayloadError as exc:
            return DeadLetter(topic, payload, exc.reason, received_at, device_id=where.device_id, kind=where.kind)
        return Message(where.kind, where.device_id, received_at, records, topic, payload)

    def records(self, where: topics.DeviceTopic, payload: bytes, received_at: datetime) -> list[Record]:
        if len(payload) > self.max_bytes:
            raise PayloadError(f"payload of {len(payload)} bytes exceeds the {self.max_bytes} byte limit")
        if where.channel == "online":
            return [Presence(where.kind, where.device_id, parse_presence(payload))]
        data = load_json(payload)
        return self.from_json(where, data, received_at)

    def from_json(self, where: topics.DeviceTopic, data: Any, received_at: datetime) -> list[Record]:
        if not isinstance(data, dict):
            raise PayloadError(f"payload must be a JSON object, got {type(data).__name__}")
        device_id, channel = where.device_id, where.channel
        try:
            if channel == "reading" and where.kind == "meter":
                plain = plain_meter_reading(data)
                if plain is not None:
                    _check_id(plain[0], device_id)
                    return [MeterReading(device_id, self._ts(plain[1], received_at), *plain[2])]
                m = MeterReadingIn.model_validate(data)
                _check_id(m.meterId, device_id)
                return [
                    MeterReading(
                        device_id,
                        self._ts(m.timestamp, received_at),
                        m.totalPowerKw,
                        m.kwhConsumedAc,
                        m.energyTotalKwh,
                        m.voltage,
                        m.current,
                        m.frequency,
                        m.powerFactor,
                    )
                ]
            if channel == "reading":
                v = VehicleReadingIn.model_validate(data)
                _check_id(v.vehicleId, device_id)
                ts = self._ts(v.timestamp, received_at)
                return [VehicleReading(device_id, ts, v.soc, v.kwhDeliveredDc, v.batteryTemp)]
            if channel == "obis":
                o = ObisReadingsIn.from_payload(data)
                _check_id(o.meterId, device_id)
                ts = self._ts(o.timestamp, received_at)
                seen: dict[str, ObisReading] = {}
                for r in o.readings:
                    value = r.value * 10.0**r.scaler
                    if value != value or abs(value) == float("inf"):
                        raise PayloadError(f"invalid payload: {r.obisCode}: value * 10^scaler overflows")
                    seen[r.obisCode] = ObisReading(
                        device_id, ts, r.obisCode, value, r.value, r.scaler, r.unit, r.quality
                    )
                return list(seen.values())
            if channel == "status":
                s = PumpStatusIn.model_validate(data)
                _check_id(s.device_id, device_id)
                return [PumpStatus(device_id, self._ts(s.timestamp, received_at), s)]
            if channel == "event":
                e = PumpEventIn.model_validate(data)
                _check_id(e.device_id, device_id)
                ts = self._ts(e.timestamp, received_at)
                return [PumpEvent(device_id, ts, e.event, data)]
            if channel == "cmd/result":
                c = CommandResultIn.model_validate(data)
                return [CommandResult(device_id, c.commandId, c.status == "ok", data)]
        except ValidationError as exc:
            errors = explain(exc)
            raise PayloadError(_reason(errors), errors=errors) from exc
        raise PayloadError(f"unknown topic {where.kind}/{device_id}/{channel}")

    def _ts(self, value: Timestamp, received_at: datetime) -> datetime:
        return to_datetime(value, tz=self.tz, received_at=received_at, max_future=self.max_future)


def load_json(payload: bytes) -> Any:
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise PayloadError(f"payload is not valid JSON: {exc}") from exc
    if too_deep(payload, data):
        raise PayloadError(f"payload nests deeper than {MAX_DEPTH} levels")
    return data


def too_deep(raw: bytes, data: Any, limit: int = MAX_DEPTH) -> bool:
    """Whether the parsed `data` of `raw` nests more than `limit` arrays and objects deep."""
    if raw.count(b"[") + raw.count(b"{") <= limit:  # cannot be that deep: skip the walk
        return False
    level: list[tuple[Any, int]] = [(data, 1)]  # a loop, not recursion: up to 1024 levels arrive here
    while level:
        value, depth = level.pop()
        if isinstance(value, dict | list):
            if depth > limit:
                return True
            level.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))
    return False


def parse_presence(payload: bytes) -> bool:
    text = payload.strip()
    if text in (b"online", b"Online", b"ONLINE", b"true", b"1"):
        return True
    if text in (b"offline", b"Offline", b"OFFLINE", b"false", b"0", b""):
        return False
    data = load_json(payload)
    if isinstance(data, str) and data.lower() in ("online", "offline"):
        return data.lower() == "online"
    try:
        return PresenceIn.model_validate(data).online
    except ValidationError as exc:
        raise PayloadError('presence must be `online`, `offline` or {"online": bool}', errors=explain(exc)) from exc
