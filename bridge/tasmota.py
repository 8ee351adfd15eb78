"""Tasmota: telemetry on `tele/<topic>/SENSOR|STATE|LWT`, relay state on `stat/<topic>/RESULT|POWER`.

Topics follow the device's FullTopic (https://tasmota.github.io/docs/MQTT/#fulltopic), `%prefix%/%topic%/`
by default; the `%topic%` level names the device. What is read:

- `SENSOR` `ENERGY`: `Total` (kWh register) → energyTotalKwh, `Power` (W) → totalPowerKw, `Voltage`,
  `Current`, `Factor`, `Frequency`; arrays (one value per channel or phase) are summed (power, current,
  energy) or averaged (voltage, factor, frequency). `Today`/`Yesterday` are not read: `Total` is the
  register, and a `Total` that goes down (EnergyReset) counts from zero (bridge.energy), never negative.
- `SENSOR` Smart Meter Interface objects (`{"SML": {"Total_in": …}}`, under whatever JSON prefix the meter
  script names): labels of `SML_LABELS` become OBIS readings and fill the meter fields `ENERGY` left empty;
  labels written as OBIS codes (`1_8_0`) become OBIS readings `1-0:1.8.0.255` (their unit is the script's).
- `Time` is the device's local time without a zone: read in SITE_TIMEZONE; a clock not yet set (1970)
  means the time we received it.
- `LWT` `Online`/`Offline` → presence; `STATE`/`RESULT`/`POWER` `POWER`(1) `ON`/`OFF` → the relay state.

A relay command is `cmnd/<topic>/POWER` `ON`/`OFF`; Tasmota answers `stat/<topic>/RESULT` `{"POWER":"ON"}`,
which carries no command id: it acknowledges the newest pending command asking for that state.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from .adapters import Adapter, Decoding, Unsupported, json_object, mean, number, obis, relay_result
from .telemetry import Presence, Record, parse_presence

PREFIXES = {"tele": ("SENSOR", "STATE", "LWT"), "stat": ("RESULT", "POWER")}
# Labels of the Smart Meter Interface docs' meter descriptors (https://tasmota.github.io/docs/Smart-Meter-Interface/)
# → (OBIS code, unit, meter field, factor to the field's unit)
SML_LABELS: dict[str, tuple[str, str, str | None, float]] = {
    "Total_in": ("1-0:1.8.0.255", "kWh", "energyTotalKwh", 1.0),
    "E_in": ("1-0:1.8.0.255", "kWh", "energyTotalKwh", 1.0),
    "Total_out": ("1-0:2.8.0.255", "kWh", None, 1.0),
    "E_out": ("1-0:2.8.0.255", "kWh", None, 1.0),
    "Power_curr": ("1-0:16.7.0.255", "W", "totalPowerKw", 0.001),
    "P_in": ("1-0:1.7.0.255", "W", "totalPowerKw", 0.001),
    "Volt_p1": ("1-0:32.7.0.255", "V", "voltage", 1.0),
    "Volt_p2": ("1-0:52.7.0.255", "V", None, 1.0),
    "Volt_p3": ("1-0:72.7.0.255", "V", None, 1.0),
    "Amperage_p1": ("1-0:31.7.0.255", "A", "current", 1.0),
    "Amperage_p2": ("1-0:51.7.0.255", "A", "current", 1.0),
    "Amperage_p3": ("1-0:71.7.0.255", "A", "current", 1.0),
    "Power_curr_p1": ("1-0:36.7.0.255", "W", None, 1.0),
    "Power_curr_p2": ("1-0:56.7.0.255", "W", None, 1.0),
    "Power_curr_p3": ("1-0:76.7.0.255", "W", None, 1.0),
    "Power_p1": ("1-0:21.7.0.255", "W", None, 1.0),
    "Power_p2": ("1-0:41.7.0.255", "W", None, 1.0),
    "Power_p3": ("1-0:61.7.0.255", "W", None, 1.0),
    "Freq": ("1-0:14.7.0.255", "Hz", "frequency", 1.0),
}
_OBIS_LABEL = re.compile(r"^(\d{1,3})_(\d{1,3})_(\d{1,3})$")
_NOT_METERS = frozenset({"Time", "Epoch", "ENERGY", "TempUnit", "PressureUnit", "SpeedUnit"})


class TasmotaAdapter(Adapter):
    firmware = "tasmota"
    presence_channels = frozenset({"tele/LWT"})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.prefix_at = self.levels.index("%prefix%")
        self.topic_at = self.levels.index("%topic%")
        # last relay state and metered power per device: a pump status needs both, they come apart
        self.relay: dict[str, bool] = {}
        self.metered: dict[str, tuple[float | None, float | None]] = {}

    def subscriptions(self) -> list[str]:
        return [self.topic_for(prefix, "+") + "/" + tail for prefix, tails in PREFIXES.items() for tail in tails]

    def topic_for(self, prefix: str, device: str) -> str:
        return "/".join(prefix if lv == "%prefix%" else device if lv == "%topic%" else lv for lv in self.levels)

    def match(self, topic: str) -> tuple[str, str] | None:
        parts = topic.split("/")
        if len(parts) != len(self.levels) + 1:
            return None
        prefix, tail = parts[self.prefix_at], parts[-1]
        if tail not in PREFIXES.get(prefix, ()):
            return None
        for i, level in enumerate(self.levels):
            if i not in (self.prefix_at, self.topic_at) and parts[i] != level:
                return None
        return parts[self.topic_at], f"{prefix}/{tail}"

    def records(self, raw: str, device_id: str, channel: str, payload: bytes, received_at: datetime) -> Decoding:
        out = Decoding(address={"firmware": "tasmota", "topic": self.topic_for("cmnd", raw) + "/"})
        if channel == "tele/LWT":
            out.records = [Presence(self.kind, device_id, parse_presence(payload))]
        elif channel == "stat/POWER":
            on = _on_off(payload.decode("utf-8", "replace").strip())
            if on is not None:
                out.records = self.relay_changed(device_id, on, received_at, payload.decode("utf-8", "replace"))
        else:
            data = json_object(payload)
            if channel == "tele/SENSOR":
                out.records = self.sensor(device_id, data, self.time_of(data, received_at))
            elif channel == "tele/STATE":
                on = _relay(data)
                if on is not None:
                    self.relay[device_id] = on
                    if self.kind == "pump":
                        out.records = self.pump_now(device_id, self.time_of(data, received_at))
            else:  # stat/RESULT answers every command; only the relay's concerns us
                on = _relay(data)
                if on is not None:
                    out.records = self.relay_changed(device_id, on, received_at, data)
        return out

    def relay_changed(self, device_id: str, on: bool, ts: datetime, data: Any) -> list[Record]:
        self.relay[device_id] = on
        records: list[Record] = [relay_result(device_id, on, data)]
        if self.kind == "pump":
            records += self.pump_now(device_id, ts)
        return records

    def pump_now(self, device_id: str, ts: datetime) -> list[Record]:
        watts, amps = self.metered.get(device_id, (None, None))
        return self.pump(device_id, ts, self.relay.get(device_id), watts, amps)

    def sensor(self, device_id: str, data: Mapping[str, Any], ts: datetime) -> list[Record]:
        fields: dict[str, float | None] = {}
        energy = data.get("ENERGY")
        if isinstance(energy, dict):
            fields = {
                "energyTotalKwh": number(energy.get("Total"), "ENERGY.Total"),
                "totalPowerKw": _kw(number(energy.get("Power"), "ENERGY.Power")),
                "voltage": number(energy.get("Voltage"), "ENERGY.Voltage", mean),
                "current": number(energy.get("Current"), "ENERGY.Current"),
                "powerFactor": number(energy.get("Factor"), "ENERGY.Factor", mean),
                "frequency": number(energy.get("Frequency"), "ENERGY.Frequency", mean),
            }
        obis_records, sml = self.smart_meter(device_id, data, ts)
        for name, value in sml.items():
            if fields.get(name) is None:
                fields[name] = value
        if self.kind == "pump":
            power = fields.get("totalPowerKw")
            if power is not None or fields.get("current") is not None:
                self.metered[device_id] = (None if power is None else power * 1000.0, fields.get("current"))
            return self.pump_now(device_id, ts)
        return [*self.meter(device_id, ts, fields), *obis_records]

    def smart_meter(
        self, device_id: str, data: Mapping[str, Any], ts: datetime
    ) -> tuple[list[Record], dict[str, float]]:
        """OBIS readings and meter fields of the Smart Meter Interface objects in a SENSOR message."""
        records: dict[str, Record] = {}
        fields: dict[str, float] = {}
        for key, values in data.items():
            if key in _NOT_METERS or not isinstance(values, dict):
                continue
            for label, value in values.items():
                known = SML_LABELS.get(label)
                generic = _OBIS_LABEL.match(label) if known is None else None
                if (known is None and generic is None) or isinstance(value, dict | list | str):
                    continue  # another sensor's reading, or a meter number
                amount = number(value, f"{key}.{label}")
                if amount is None:
                    continue
                if known is not None:
                    code, unit, name, factor = known
                    records[code] = obis(device_id, ts, code, amount, unit)
                    if name == "current":
                        fields[name] = fields.get(name, 0.0) + amount  # the phases' currents add up
                    elif name is not None and name not in fields:
                        fields[name] = amount * factor
                elif generic is not None:
                    code = "1-0:{}.{}.{}.255".format(*generic.groups())
                    records.setdefault(code, obis(device_id, ts, code, amount, None))
        return list(records.values()), fields

    def time_of(self, data: Mapping[str, Any], received_at: datetime) -> datetime:
        value = data.get("Time")
        if isinstance(value, str) and value[:4].isdigit() and int(value[:4]) < 2000:
            return received_at  # no NTP time yet: Tasmota counts from 1970
        return self.time(value, received_at)


def _kw(watts: float | None) -> float | None:
    return None if watts is None else watts / 1000.0


def _on_off(text: Any) -> bool | None:
    if isinstance(text, str) and text.upper() in ("ON", "OFF"):
        return text.upper() == "ON"
    return None


def _relay(data: Mapping[str, Any]) -> bool | None:
    """Relay 1's state: `POWER` on single-relay devices, `POWER1` on multi-relay ones."""
    for key in ("POWER", "POWER1"):
        if key in data:
            return _on_off(data[key])
    return None


def relay_command(address: Mapping[str, Any], on: bool) -> tuple[list[tuple[str, bytes]], dict[str, Any]]:
    base = address.get("topic")
    if not isinstance(base, str) or not base:
        raise Unsupported("the device's Tasmota command topic is unknown")
    return [(f"{base}POWER", b"ON" if on else b"OFF")], {}
