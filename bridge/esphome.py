"""ESPHome's MQTT client: plain-text states on `<prefix>/<component>/<name>/state`, `<prefix>/status`.

Docs: https://esphome.io/components/mqtt.html — state topic `<TOPIC_PREFIX>/<COMPONENT_TYPE>/<COMPONENT_NAME>/state`,
command topic `…/command`, availability `<TOPIC_PREFIX>/status` `online`/`offline` (birth and will,
retained), states retained by default.

Each sensor publishes on its own topic, so the node's latest values are kept here and every new value
yields a reading of all of them: a reading with power alone between two with the register would break
the register differences. Sensors are read by name (the topic level is ESPHome's object id):

- `…power_factor…`/`pf` → powerFactor; `…voltage…` → voltage (V); `…current…` → current (A);
  `…frequency…` → frequency (Hz);
- `…energy…` → energyTotalKwh in kWh (`…_wh`: Wh); a daily total's midnight reset counts from zero;
- `…power…` (not apparent/reactive) → totalPowerKw from W (`…_kw`: kW);
- others (temperature, wifi signal, `…yesterday…`) are not read.

The node's relay is its switch named `pump` or `relay`, else the first switch it reports: its `ON`/`OFF`
state is `pump.running` for pumps, and confirms a pending relay command asking for that state.

States the broker replays on our (re)subscription carry the retain flag: they are taken into memory but
not stored again as new readings (bridge.adapters).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from .adapters import Adapter, Decoding, Unsupported, relay_result
from .errors import PayloadError
from .telemetry import Presence, Record, parse_presence

PREFERRED_SWITCHES = ("pump", "relay")


def sensor_field(name: str) -> tuple[str, float] | None:
    """Which meter field an ESPHome sensor (by object id) feeds, and the factor to the field's unit."""
    n = name.lower()
    if "yesterday" in n or "apparent" in n or "reactive" in n:
        return None
    if "power_factor" in n or n == "pf" or n.endswith("_pf"):
        return ("powerFactor", 1.0)
    if "voltage" in n:
        return ("voltage", 1.0)
    if "current" in n:
        return ("current", 1.0)
    if "frequency" in n:
        return ("frequency", 1.0)
    if "energy" in n or n.endswith("_kwh") or n.endswith("_wh"):
        return ("energyTotalKwh", 0.001 if n.endswith("_wh") else 1.0)
    if "power" in n:
        return ("totalPowerKw", 1.0 if n.endswith("_kw") else 0.001)
    return None


class EsphomeAdapter(Adapter):
    firmware = "esphome"
    presence_channels = frozenset({"status"})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.values: dict[str, dict[str, float]] = {}  # device → meter field → latest value
        self.switch: dict[str, str] = {}  # device → the switch taken as its relay
        self.relay: dict[str, bool] = {}

    def subscriptions(self) -> list[str]:
        prefix = self.subscription_prefix()
        return [f"{prefix}/status", f"{prefix}/sensor/+/state", f"{prefix}/switch/+/state"]

    def match(self, topic: str) -> tuple[str, str] | None:
        hit = self.prefix_match(topic.split("/"))
        if hit is None:
            return None
        raw, rest = hit
        if rest == ["status"]:
            return raw, "status"
        if len(rest) == 3 and rest[0] in ("sensor", "switch") and rest[2] == "state" and rest[1]:
            return raw, f"{rest[0]}/{rest[1]}"
        return None

    def records(self, raw: str, device_id: str, channel: str, payload: bytes, received_at: datetime) -> Decoding:
        out = Decoding()
        if channel == "status":
            out.records = [Presence(self.kind, device_id, parse_presence(payload))]
        else:
            component, _, name = channel.partition("/")
            text = payload.decode("utf-8", "replace").strip()
            if component == "sensor":
                out.records = self.sensor(device_id, name, text, received_at)
            else:
                out.records = self.switched(device_id, name, text, received_at)
        address: dict[str, Any] = {"firmware": "esphome", "prefix": self.prefix_of(raw)}
        if device_id in self.switch:
            address["switch"] = self.switch[device_id]
        out.address = address
        return out

    def sensor(self, device_id: str, name: str, text: str, ts: datetime) -> list[Record]:
        target = sensor_field(name)
        if target is None:
            return []
        try:
            value = float(text)
        except ValueError as exc:
            raise PayloadError(f"invalid payload: sensor {name!r}: {text[:40]!r} is not a number") from exc
        if value != value:
            return []  # ESPHome publishes `nan` while a sensor has no value
        field, factor = target
        values = self.values.setdefault(device_id, {})
        values[field] = value * factor
        if self.kind == "pump":
            return self.pump_now(device_id, ts)
        return self.meter(device_id, ts, values)

    def switched(self, device_id: str, name: str, text: str, ts: datetime) -> list[Record]:
        state = text.upper()
        if state not in ("ON", "OFF"):
            raise PayloadError(f"invalid payload: switch {name!r}: expected ON or OFF, got {text[:40]!r}")
        chosen = self.switch.get(device_id)
        if chosen is None or (name in PREFERRED_SWITCHES and chosen not in PREFERRED_SWITCHES):
            self.switch[device_id] = chosen = name
        if name != chosen:
            return []
        on = state == "ON"
        self.relay[device_id] = on
        records: list[Record] = [relay_result(device_id, on, {"switch": name, "state": state})]
        if self.kind == "pump":
            records += self.pump_now(device_id, ts)
        return records

    def pump_now(self, device_id: str, ts: datetime) -> list[Record]:
        values = self.values.get(device_id, {})
        kw = values.get("totalPowerKw")
        return self.pump(
            device_id, ts, self.relay.get(device_id), None if kw is None else kw * 1000.0, values.get("current")
        )


def relay_command(address: Mapping[str, Any], on: bool) -> tuple[list[tuple[str, bytes]], dict[str, Any]]:
    prefix, switch = address.get("prefix"), address.get("switch")
    if not isinstance(prefix, str) or not isinstance(switch, str):
        raise Unsupported("no switch of this ESPHome node has reported its state yet: its relay is unknown")
    return [(f"{prefix}/switch/{switch}/command", b"ON" if on else b"OFF")], {}
