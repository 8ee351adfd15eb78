"""Adapters: Tasmota, Shelly Gen2 and ESPHome devices taken as they are, in their own topics and payloads.

`ADAPTERS` names, per topic prefix, which firmware speaks there and what kind of device it is:

    ADAPTERS="tasmota:meter=%prefix%/%topic%/; shelly:pump=shellies/+; esphome:meter=esphome/+"

Each entry is `<firmware>[:<kind>]=<pattern>`, kind `meter` (default) or `pump`. For Tasmota the pattern is
the device's FullTopic (`%prefix%` and `%topic%` tokens, the `%topic%` level naming the device). For
Shelly and ESPHome it is the topic prefix, where a `+` level stands for the device; without a `+` the
prefix is one device's, named by its last level. The first entry whose pattern matches a topic owns it.

An adapter turns a firmware's messages into the records native devices produce (meter readings, OBIS
readings, pump status, presence, command results), and the API's relay commands into the firmware's
dialect (`command`). Decoding runs in paho's thread like the native decoder; what an adapter remembers
between messages (a Shelly's last status, an ESPHome node's last values) lives in memory here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, tzinfo
from typing import Any, ClassVar, Literal

import orjson
from pydantic import ValidationError

from . import topics
from .errors import ConfigError, PayloadError
from .telemetry import (
    CommandResult,
    DeadLetter,
    Decoded,
    Message,
    MeterReading,
    MeterReadingIn,
    ObisReading,
    Presence,
    PumpStatus,
    PumpStatusIn,
    Record,
    _reason,
    explain,
    to_datetime,
)

Firmware = Literal["tasmota", "shelly", "esphome"]
FIRMWARES: tuple[Firmware, ...] = ("tasmota", "shelly", "esphome")
# Where a Shelly's answer to our RPC arrives: `<RPC_SRC>/<kind>s/<device id>/rpc` (the request's `src`).
DEFAULT_RPC_SRC = "telemetry-api"
# API command names that switch an adapted device's relay (with `"state": "on" | "off"`).
RELAY_COMMANDS = frozenset({"pump", "relay", "power", "switch"})
_BAD_ID_CHAR = re.compile(r"[^A-Za-z0-9_.:-]")
_ENTRY = re.compile(r"^\s*(?P<firmware>[a-z]+)\s*(?::\s*(?P<kind>[a-z]+)\s*)?=\s*(?P<pattern>\S+)\s*$")


@dataclass(frozen=True)
class Spec:
    """One `ADAPTERS` entry."""

    firmware: Firmware
    kind: topics.Kind
    pattern: str

    def __str__(self) -> str:
        return f"{self.firmware}:{self.kind}={self.pattern}"


def parse_specs(text: str | None, variable: str = "ADAPTERS") -> tuple[Spec, ...]:
    """`tasmota:meter=%prefix%/%topic%/; shelly:pump=shellies/+` → specs; ConfigError naming what is wrong."""
    specs: list[Spec] = []
    for raw in (text or "").split(";"):
        if not raw.strip():
            continue
        m = _ENTRY.match(raw)
        if not m:
            raise ConfigError(f"{variable}: expected <firmware>[:<kind>]=<topic pattern>, got {raw.strip()!r}")
        firmware, kind, pattern = m["firmware"], m["kind"] or "meter", m["pattern"]
        if firmware not in FIRMWARES:
            raise ConfigError(f"{variable}: unknown firmware {firmware!r} (known: {', '.join(FIRMWARES)})")
        if kind not in ("meter", "pump"):
            raise ConfigError(f"{variable}: kind must be meter or pump, got {kind!r} in {raw.strip()!r}")
        levels = pattern.strip("/").split("/")
        problem = _pattern_problem(firmware, levels)
        if problem:
            raise ConfigError(f"{variable}: {problem} in {raw.strip()!r}")
        specs.append(Spec(firmware, kind, pattern))  # type: ignore[arg-type]
    return tuple(specs)


def _pattern_problem(firmware: str, levels: list[str]) -> str | None:
    if any(not level for level in levels):
        return "empty topic level"
    if any("#" in level or level.startswith("$") for level in levels):
        return "`#` and `$` are not allowed"
    if levels[0] in topics.PREFIX_TO_KIND or levels[0] in ("telemetry", "alerts"):
        return f"{levels[0]!r} is the bridge's own topic space"
    if firmware == "tasmota":
        if levels.count("%prefix%") != 1 or levels.count("%topic%") != 1:
            return "a Tasmota FullTopic needs one %prefix% and one %topic%"
        if any("+" in level or ("%" in level and level not in ("%prefix%", "%topic%")) for level in levels):
            return "a Tasmota FullTopic has literal levels besides %prefix% and %topic%"
        return None
    if any("%" in level for level in levels):
        return f"{firmware} patterns are topic prefixes: no % tokens"
    if sum(level == "+" for level in levels) > 1 or any("+" in level and level != "+" for level in levels):
        return "at most one whole `+` level (the device)"
    return None


def device_id_of(raw: str) -> str:
    """The firmware's name for a device (a topic level) as one of our device ids."""
    if not raw:
        raise PayloadError("invalid device id '' (an empty topic level)")
    return _BAD_ID_CHAR.sub("_", raw)[:64]


# ---- what the firmware modules share -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Context:
    tz: tzinfo
    max_future: float = 600.0
    max_bytes: int = 64 * 1024
    rpc_src: str = DEFAULT_RPC_SRC


@dataclass(slots=True)
class Decoding:
    """What one message yields: records, and the device's command address (stored in `devices.meta`)."""

    records: list[Record] = field(default_factory=list)
    address: dict[str, Any] | None = None


class Adapter:
    """One `ADAPTERS` entry at work: owns the topics its pattern matches."""

    firmware: ClassVar[Firmware]
    presence_channels: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, spec: Spec, ctx: Context) -> None:
        self.spec, self.kind, self.ctx = spec, spec.kind, ctx
        self.levels = spec.pattern.strip("/").split("/")

    def subscriptions(self) -> list[str]:
        raise NotImplementedError

    def match(self, topic: str) -> tuple[str, str] | None:
        """`(the firmware's device name, channel)` when this adapter owns `topic`."""
        raise NotImplementedError

    def records(self, raw: str, device_id: str, channel: str, payload: bytes, received_at: datetime) -> Decoding:
        raise NotImplementedError

    def decode(self, topic: str, payload: bytes, received_at: datetime, retained: bool = False) -> Decoded | None:
        hit = self.match(topic)
        if hit is None:
            return DeadLetter(topic, payload, f"unknown topic {topic!r}", received_at)
        raw, channel = hit
        if not payload and channel not in self.presence_channels:
            return None  # a retained message being cleared (`esphome … clean-mqtt`): nothing to read
        device_id: str | None = None
        try:
            device_id = device_id_of(raw)
            if len(payload) > self.ctx.max_bytes:
                raise PayloadError(f"payload of {len(payload)} bytes exceeds the {self.ctx.max_bytes} byte limit")
            out = self.records(raw, device_id, channel, payload, received_at)
        except PayloadError as exc:
            return DeadLetter(topic, payload, exc.reason, received_at, device_id=device_id, kind=self.kind)
        records = out.records
        if retained:
            # the broker replaying what it kept on our (re)subscription: old values, not new readings;
            # the adapter has taken them into memory, and a kept presence (will / birth) still counts
            records = [r for r in records if isinstance(r, Presence)]
            if not records:
                return None
        return Message(self.kind, device_id, received_at, records, topic, payload, address=out.address)

    # ---- helpers for the firmware modules ----------------------------------------------------

    def prefix_match(self, parts: list[str]) -> tuple[str, list[str]] | None:
        """Match a Shelly/ESPHome prefix pattern: `(device name, remaining levels)`."""
        n = len(self.levels)
        if len(parts) <= n:
            return None
        raw = None
        for level, part in zip(self.levels, parts, strict=False):
            if level == "+":
                raw = part
            elif level != part:
                return None
        return (raw if raw is not None else self.levels[-1]), parts[n:]

    def prefix_of(self, raw: str) -> str:
        """The concrete topic prefix of the device named `raw`."""
        return "/".join(raw if level == "+" else level for level in self.levels)

    def subscription_prefix(self) -> str:
        return "/".join(self.levels)

    def time(self, value: Any, received_at: datetime) -> datetime:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float | str)):
            raise PayloadError("invalid payload: timestamp: must be epoch milliseconds or ISO-8601")
        return to_datetime(value, tz=self.ctx.tz, received_at=received_at, max_future=self.ctx.max_future)

    def meter(self, device_id: str, ts: datetime, fields: Mapping[str, float | None]) -> list[Record]:
        """A meter reading validated like a native one; none when there is nothing to read."""
        present = {k: v for k, v in fields.items() if v is not None}
        if not present:
            return []
        try:
            m = MeterReadingIn.model_validate(present)
        except ValidationError as exc:
            errors = explain(exc)
            raise PayloadError(_reason(errors), errors=errors) from exc
        return [
            MeterReading(
                device_id,
                ts,
                m.totalPowerKw,
                m.kwhConsumedAc,
                m.energyTotalKwh,
                m.voltage,
                m.current,
                m.frequency,
                m.powerFactor,
            )
        ]

    def pump(
        self, device_id: str, ts: datetime, running: bool | None, watts: float | None, amps: float | None
    ) -> list[Record]:
        """A relay as a pump: no tanks, the relay's state as `pump.running`, and its power where metered."""
        if running is None:
            return []
        doc = {
            "ground_tank": {},
            "roof_tank": {},
            # a metering chip reads a few negative watts around zero: no pump runs backwards
            "pump": {
                "running": running,
                "power_watts": None if watts is None else max(watts, 0.0),
                "current_amps": amps,
            },
        }
        try:
            status = PumpStatusIn.model_validate(doc)
        except ValidationError as exc:
            errors = explain(exc)
            raise PayloadError(_reason(errors), errors=errors) from exc
        return [PumpStatus(device_id, ts, status)]


def relay_result(device_id: str, on: bool, data: Any) -> CommandResult:
    """The device reports its relay `on`: that confirms the newest pending command asking for that state."""
    return CommandResult(device_id, "", True, {"status": "ok", "data": data}, match={"relay": "on" if on else "off"})


def obis(device_id: str, ts: datetime, code: str, value: float, unit: str | None) -> ObisReading:
    return ObisReading(device_id, ts, code, value, value, 0, unit, None)


def number(value: Any, what: str, combine: Callable[[list[float]], float] = sum) -> float | None:
    """A JSON number, or a list of them (one per phase or channel) combined; None when absent."""
    if value is None:
        return None
    if isinstance(value, list) and value and all(_is_number(v) for v in value):
        return float(combine([float(v) for v in value]))
    if _is_number(value):
        return float(value)
    raise PayloadError(f"invalid payload: {what}: expected a number, got {orjson.dumps(value).decode()[:40]}")


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value


def json_object(payload: bytes) -> dict[str, Any]:
    from .telemetry import load_json

    data = load_json(payload)
    if not isinstance(data, dict):
        raise PayloadError(f"payload must be a JSON object, got {type(data).__name__}")
    return data


# ---- the registry ----------------------------------------------------------------------------------


def _classes() -> dict[str, type[Adapter]]:
    # imported here: each firmware module builds on the Adapter class above
    from .esphome import EsphomeAdapter
    from .shelly import ShellyAdapter
    from .tasmota import TasmotaAdapter

    return {"tasmota": TasmotaAdapter, "shelly": ShellyAdapter, "esphome": EsphomeAdapter}


class Adapters:
    """Every configured adapter; `owner(topic)` finds the one a topic belongs to."""

    def __init__(self, specs: Iterable[Spec], ctx: Context) -> None:
        classes = _classes()
        self.ctx = ctx
        self.adapters = [classes[s.firmware](s, ctx) for s in specs]

    def subscriptions(self) -> list[str]:
        out: list[str] = []
        for adapter in self.adapters:
            out.extend(t for t in adapter.subscriptions() if t not in out)
        return out

    def owner(self, topic: str) -> Adapter | None:
        for adapter in self.adapters:
            if adapter.match(topic) is not None:
                return adapter
        return None

    def decode(self, topic: str, payload: bytes, received_at: datetime, retained: bool = False) -> Decoded | None:
        adapter = self.owner(topic)
        if adapter is None:
            return DeadLetter(topic, payload, f"unknown topic {topic!r}", received_at)
        return adapter.decode(topic, payload, received_at, retained)


# ---- commands (the API's side) ---------------------------------------------------------------------


class Unsupported(ValueError):
    """A command the adapted device's firmware cannot carry out."""


@dataclass(frozen=True, slots=True)
class Dialect:
    """A command as the firmware takes it: the messages to publish and what to store with the command.

    `stored` goes into the command's stored payload; the bridge matches the device's answer against it
    (`{"relay": "on"}`: the newest pending command asking for that relay state; `{"rpcId": n}`: a Shelly's
    JSON-RPC id).
    """

    messages: list[tuple[str, bytes]]
    stored: dict[str, Any]


def relay_state(command: str, params: Mapping[str, Any]) -> bool:
    if command not in RELAY_COMMANDS:
        raise Unsupported(
            f"{command!r} is not a command this device's firmware understands; "
            f"it takes {', '.join(sorted(RELAY_COMMANDS))} with state on or off"
        )
    state = params.get("state")
    if isinstance(state, bool):
        return state
    if isinstance(state, str) and state.lower() in ("on", "off"):
        return state.lower() == "on"
    raise Unsupported('state must be "on" or "off"')


def command(
    address: Mapping[str, Any],
    kind: str,
    device_id: str,
    name: str,
    params: Mapping[str, Any],
    rpc_src: str = DEFAULT_RPC_SRC,
) -> Dialect:
    """The API's command `name` for the adapted device at `address` (its `devices.meta.adapter`)."""
    on = relay_state(name, params)
    firmware = address.get("firmware")
    if firmware == "tasmota":
        from .tasmota import relay_command as tasmota_relay

        messages, stored = tasmota_relay(address, on)
    elif firmware == "shelly":
        from .shelly import relay_command as shelly_relay

        messages, stored = shelly_relay(address, on, kind, device_id, rpc_src)
    elif firmware == "esphome":
        from .esphome import relay_command as esphome_relay

        messages, stored = esphome_relay(address, on)
    else:
        raise Unsupported(f"unknown firmware {firmware!r} in the device's adapter address")
    sent = [{"topic": t, "payload": p.decode()} for t, p in messages]
    return Dialect(messages, {"relay": "on" if on else "off", **stored, "firmware": firmware, "sentAs": sent})
