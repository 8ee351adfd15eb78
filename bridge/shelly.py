"""Shelly Gen2: `<prefix>/events/rpc` notifications, `<prefix>/status/<component:id>`, `<prefix>/online`.

Docs: https://shelly-api-docs.shelly.cloud/gen2/General/Notifications (NotifyStatus),
https://shelly-api-docs.shelly.cloud/gen2/ComponentsAndServices/Mqtt (topics),
https://shelly-api-docs.shelly.cloud/gen2/General/RPCProtocol (frames).

NotifyStatus carries only what changed: it is overlaid on the device's last known status, kept here per
device, which is what the docs intend ("overlay the changes from NotifyStatus over a known status").
`<prefix>/status/<component:id>` (status_ntf) carries a component's whole status and replaces it.

- meters: channel 0 of `switch`/`pm1` (`apower` W, `voltage`, `current`, `pf`, `freq`, `aenergy.total` Wh),
  or `em1`+`em1data`, or `em`+`emdata` (Pro 3EM totals) → a meter reading whenever one of them changed;
- pumps: `switch:0` `output` → `pump.running`, with `apower` and `current`;
- `<prefix>/online` `true`/`false` → presence.

A relay command is JSON-RPC `Switch.Set` on `<prefix>/rpc` with a numeric `id` and `src` =
`<RPC_SRC>/<kind>s/<device id>`: Shelly publishes the reply on `<src>/rpc`, so the reply names the device
and its kind, and its `id` names the command (stored with it as `rpcId`).
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import orjson

from .adapters import Adapter, Decoding, Unsupported, json_object, number
from .errors import PayloadError
from .telemetry import CommandResult, Presence, Record, parse_presence

METERING = frozenset({"switch", "pm1", "em1", "em1data", "em", "emdata"})


class ShellyAdapter(Adapter):
    firmware = "shelly"
    presence_channels = frozenset({"online"})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reply_levels = [*self.ctx.rpc_src.split("/"), f"{self.kind}s"]
        self.status: dict[str, dict[str, dict[str, Any]]] = {}  # device → component key → its status

    def subscriptions(self) -> list[str]:
        prefix = self.subscription_prefix()
        reply = "/".join(self.reply_levels)
        return [f"{prefix}/online", f"{prefix}/events/rpc", f"{prefix}/status/+", f"{reply}/+/rpc"]

    def match(self, topic: str) -> tuple[str, str] | None:
        parts = topic.split("/")
        n = len(self.reply_levels)
        if len(parts) == n + 2 and parts[-1] == "rpc" and parts[:n] == self.reply_levels:
            return parts[n], "reply"
        hit = self.prefix_match(parts)
        if hit is None:
            return None
        raw, rest = hit
        if rest == ["online"]:
            return raw, "online"
        if rest == ["events", "rpc"]:
            return raw, "events"
        if len(rest) == 2 and rest[0] == "status":
            return raw, f"status/{rest[1]}"
        return None

    def records(self, raw: str, device_id: str, channel: str, payload: bytes, received_at: datetime) -> Decoding:
        if channel == "reply":
            return Decoding(self.reply(device_id, json_object(payload)))
        out = Decoding(address={"firmware": "shelly", "rpc": f"{self.prefix_of(raw)}/rpc", "switch": 0})
        if channel == "online":
            out.records = [Presence(self.kind, device_id, parse_presence(payload))]
            return out
        frame = json_object(payload)
        known = self.status.setdefault(device_id, {})
        if channel == "events":
            method, params = frame.get("method"), frame.get("params")
            if method not in ("NotifyStatus", "NotifyFullStatus") or not isinstance(params, dict):
                return out  # NotifyEvent and the like: the device is alive, nothing to store
            changed = {k: v for k, v in params.items() if k != "ts" and isinstance(v, dict)}
            for key, delta in changed.items():
                known[key] = delta if method == "NotifyFullStatus" else overlay(known.get(key, {}), delta)
            ts = params.get("ts")
            when = self.time(None if ts is None else _ms(ts), received_at)
        else:
            changed = {channel.removeprefix("status/"): frame}
            known.update(changed)
            when = received_at
        out.records = self.readings(device_id, known, set(changed), when)
        return out

    def readings(self, device_id: str, known: Mapping[str, Any], changed: set[str], ts: datetime) -> list[Record]:
        if self.kind == "pump":
            if "switch:0" not in changed:
                return []
            sw = known.get("switch:0", {})
            running = sw.get("output")
            return self.pump(
                device_id,
                ts,
                running if isinstance(running, bool) else None,
                number(sw.get("apower"), "switch:0.apower"),
                number(sw.get("current"), "switch:0.current"),
            )
        if not any(key.partition(":")[0] in METERING for key in changed):
            return []
        return self.meter(device_id, ts, meter_fields(known))

    def reply(self, device_id: str, frame: Mapping[str, Any]) -> list[Record]:
        if "method" in frame:
            return []  # a request or notification sent to our name, not an answer
        rpc_id = frame.get("id")
        if not isinstance(rpc_id, int) or isinstance(rpc_id, bool):
            raise PayloadError("invalid payload: id: a reply needs the numeric id of our request")
        error = frame.get("error")
        if error is not None:
            message = error.get("message") if isinstance(error, dict) else None
            payload = {"status": "error", "message": message if isinstance(message, str) else str(error), "data": error}
            return [CommandResult(device_id, "", False, payload, match={"rpcId": rpc_id})]
        return [
            CommandResult(device_id, "", True, {"status": "ok", "data": frame.get("result")}, match={"rpcId": rpc_id})
        ]


def overlay(base: Mapping[str, Any], delta: Mapping[str, Any]) -> dict[str, Any]:
    """`delta` laid over `base`, objects merged key by key (NotifyStatus sends changed keys only)."""
    out = dict(base)
    for key, value in delta.items():
        old = out.get(key)
        out[key] = overlay(old, value) if isinstance(old, dict) and isinstance(value, dict) else value
    return out


def meter_fields(known: Mapping[str, Any]) -> dict[str, float | None]:
    """Meter fields from channel 0 of the first metering component the device has."""
    for key in ("switch:0", "pm1:0"):
        c = known.get(key)
        if isinstance(c, dict) and ("apower" in c or "aenergy" in c):
            energy = c.get("aenergy")
            return {
                "totalPowerKw": _kw(number(c.get("apower"), f"{key}.apower")),
                "energyTotalKwh": _kw(number(energy.get("total"), f"{key}.aenergy.total"))
                if isinstance(energy, dict)
                else None,
                "voltage": number(c.get("voltage"), f"{key}.voltage"),
                "current": number(c.get("current"), f"{key}.current"),
                "powerFactor": number(c.get("pf"), f"{key}.pf"),
                "frequency": number(c.get("freq"), f"{key}.freq"),
            }
    em1, em1data = known.get("em1:0"), known.get("em1data:0")
    if isinstance(em1, dict) or isinstance(em1data, dict):
        em1 = em1 if isinstance(em1, dict) else {}
        data = em1data if isinstance(em1data, dict) else {}
        return {
            "totalPowerKw": _kw(number(em1.get("act_power"), "em1:0.act_power")),
            "energyTotalKwh": _kw(number(data.get("total_act_energy"), "em1data:0.total_act_energy")),
            "voltage": number(em1.get("voltage"), "em1:0.voltage"),
            "current": number(em1.get("current"), "em1:0.current"),
            "powerFactor": number(em1.get("pf"), "em1:0.pf"),
            "frequency": number(em1.get("freq"), "em1:0.freq"),
        }
    em, emdata = known.get("em:0"), known.get("emdata:0")
    em = em if isinstance(em, dict) else {}
    data = emdata if isinstance(emdata, dict) else {}
    return {
        "totalPowerKw": _kw(number(em.get("total_act_power"), "em:0.total_act_power")),
        "energyTotalKwh": _kw(number(data.get("total_act"), "emdata:0.total_act")),
        "voltage": number(em.get("a_voltage"), "em:0.a_voltage"),
        "current": number(em.get("total_current"), "em:0.total_current"),
        "powerFactor": number(em.get("a_pf"), "em:0.a_pf"),
        "frequency": number(em.get("a_freq"), "em:0.a_freq"),
    }


def _kw(value: float | None) -> float | None:
    """W → kW and Wh → kWh."""
    return None if value is None else value / 1000.0


def _ms(seconds: Any) -> Any:
    # NotifyStatus `ts` is Unix seconds with a fraction; our timestamps are epoch milliseconds
    return seconds * 1000.0 if isinstance(seconds, int | float) and not isinstance(seconds, bool) else seconds


def relay_command(
    address: Mapping[str, Any], on: bool, kind: str, device_id: str, rpc_src: str
) -> tuple[list[tuple[str, bytes]], dict[str, Any]]:
    topic, switch = address.get("rpc"), address.get("switch", 0)
    if not isinstance(topic, str) or not topic:
        raise Unsupported("the device's Shelly RPC topic is unknown")
    # int32-sized: Shelly's RPC layer keeps request ids as integers
    rpc_id = secrets.randbelow(2**31 - 2) + 1
    frame = {
        "id": rpc_id,
        "src": f"{rpc_src}/{kind}s/{device_id}",
        "method": "Switch.Set",
        "params": {"id": switch, "on": on},
    }
    return [(topic, orjson.dumps(frame))], {"rpcId": rpc_id}
