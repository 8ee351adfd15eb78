"""`firmware-sim sample`: load a realistic stretch of days through the normal ingest path, idempotently.

Three site meters, two EVs with their chargers' AC meters (`…-ev-002` is the faulty one, ≈0.8 DC/AC)
and two ESP32 pump controllers report every `--step` seconds of simulated time over a fixed window;
every message goes to its device topic at QoS 1, as a device's would, and the bridge stores it.
MQTT_URL and SITE_TIMEZONE come from the environment or .env, as for the bridge.

The default window runs from 00:00 yesterday (SITE_TIMEZONE) to the start of the 30-minute block in
progress: yesterday has all its blocks, today's are filled so far, and the 24-hour efficiency (which
looks back only 24 hours) has a whole day of charging to judge. `--day` loads one local day, `--hours
N` only the last N hours of the window, `--end` moves its end.

Idempotent: each day is simulated from its local midnight with seeds derived from (`--seed`, date,
device) and reports on that day's time grid, so every run publishes exactly the same message for a
given device and time, whatever window it loads. The bridge stores a repeat once: loading the same
window again changes nothing, and a later or wider window only adds what is missing.

The EV ↔ charger correlations go to `POST /v1/ingestion/correlate` when `--api` (or API_URL) is
given, with `--token` (or API_TOKEN, else the first of API_TOKENS); otherwise they are printed.
Nothing reports after the run: the devices go offline once DEVICE_OFFLINE_AFTER has passed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, tzinfo
from datetime import time as dtime
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import paho.mqtt.client as mqtt

from bridge.config import MqttUrl, Settings, environment
from bridge.errors import BrokerUnavailable, ConfigError, TelemetryError

from .model import (
    MeterModel,
    Outbound,
    PumpModel,
    VehicleModel,
    charger_id,
    correlations,
    daily_shape,
    meter_id,
    pump_id,
    vehicle_id,
)

log = logging.getLogger(__name__)

METERS = 3
VEHICLES = 2
PUMPS = 2
FAULTY_VEHICLE = 2  # its charger wastes ~20 %: efficiency ≈ 0.8, below the 0.85 fault line
BLOCK_S = 1800
DEFAULT_STEP = 60.0
# Each day's simulation starts a site meter's register at base + days since REGISTER_EPOCH x 1.5
# nominal days' kWh, so it never runs backwards from one independently simulated day to the next
# (the load's noise never adds half a day). The jump at midnight is never counted: see `messages`.
NOMINAL_DAY_SHAPE = sum(daily_shape(m / 60.0) for m in range(24 * 60)) / 60.0  # in hours of peak load
REGISTER_EPOCH = date(2020, 1, 1)


# ---- the window ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """Simulated time (start, end] in epoch seconds; readings exactly at `start` belong to the day before."""

    start: float
    end: float

    def __post_init__(self) -> None:
        if not self.end > self.start:
            raise ValueError("the window is empty: its end must come after its start")

    def describe(self, tz: tzinfo) -> str:
        def fmt(t: float) -> str:
            return datetime.fromtimestamp(t, tz).isoformat(timespec="minutes")

        return f"{fmt(self.start)} → {fmt(self.end)}"


def midnight(day: date, tz: tzinfo) -> float:
    return datetime.combine(day, dtime(0), tzinfo=tz).timestamp()


def current_block_start(now: float) -> float:
    """Start of the 30-minute block in progress (the bridge's blocks: :00 and :30)."""
    return now // BLOCK_S * BLOCK_S


def window(
    tz: tzinfo,
    now: float,
    *,
    day: date | None = None,
    hours: float | None = None,
    end: float | None = None,
) -> Window:
    """The window a run loads; see the module docstring. Never reaches past `now`."""
    today = datetime.fromtimestamp(now, tz).date()
    if day is not None and day > today:
        raise ValueError(f"--day {day.isoformat()} is in the future (today is {today.isoformat()} in {tz})")
    if end is None:
        end = current_block_start(now)
        if day is not None:
            end = min(end, midnight(day + timedelta(days=1), tz))
    elif end > now:
        raise ValueError("--end lies in the future: the bridge refuses readings from the future")
    if hours is not None:
        start = end - hours * 3600.0
    elif day is not None:
        start = midnight(day, tz)
    else:
        start = midnight(today - timedelta(days=1), tz)
    return Window(start, end)


# ---- the fleet of one day ------------------------------------------------------------------------


def _rng(*parts: object) -> random.Random:
    # string seeds are hashed with SHA-512: the same in every process, unlike hash()
    return random.Random(":".join(str(p) for p in parts))


@dataclass(frozen=True)
class Spec:
    """What the sample loads: which devices, which seed, which report interval."""

    seed: int = 1
    prefix: str = "sample"
    step: float = DEFAULT_STEP
    tz: tzinfo = field(default=UTC)

    def device_ids(self) -> list[str]:
        ids = [meter_id(self.prefix, i) for i in range(1, METERS + 1)]
        for i in range(1, VEHICLES + 1):
            ids += [vehicle_id(self.prefix, i), charger_id(vehicle_id(self.prefix, i))]
        return ids + [pump_id(self.prefix, i) for i in range(1, PUMPS + 1)]

    def correlations(self) -> list[dict[str, str]]:
        return correlations(self.prefix, VEHICLES)


class DayFleet:
    """Every sample device on one local day, from its midnight.

    What a device *is* (a meter's peak load, an EV's battery and charger, which EV is faulty) comes
    from (seed, device) and is the same every day; what it *does* comes from (seed, date, device).
    """

    def __init__(self, spec: Spec, day: date) -> None:
        self.spec, self.day = spec, day
        self.t0 = t0 = midnight(day, spec.tz)
        seed, tz, p = spec.seed, spec.tz, spec.prefix
        days = (day - REGISTER_EPOCH).days
        self.meters: list[MeterModel] = []
        for i in range(1, METERS + 1):
            trait = _rng(seed, "sample-meter", i)
            peak = trait.uniform(20.0, 80.0)
            register = trait.uniform(1000.0, 50000.0) + max(0, days) * 1.5 * peak * NOMINAL_DAY_SHAPE
            rng = _rng(seed, day.isoformat(), "meter", i)
            self.meters.append(MeterModel(meter_id(p, i), rng, t0, tz, peak_kw=peak, register_kwh=register))
        self.vehicles: list[tuple[VehicleModel, MeterModel]] = []
        for i in range(1, VEHICLES + 1):
            trait = _rng(seed, "sample-vehicle", i)
            capacity = trait.choice((50.0, 60.0, 75.0, 82.0))
            max_kw = trait.choice((11.0, 22.0, 50.0))
            efficiency = trait.uniform(0.78, 0.82) if i == FAULTY_VEHICLE else trait.uniform(0.88, 0.92)
            vid = vehicle_id(p, i)
            vehicle = VehicleModel(vid, _rng(seed, day.isoformat(), "vehicle", i), t0, efficiency=efficiency)
            vehicle.capacity_kwh, vehicle.max_kw = capacity, max_kw
            charger = MeterModel(charger_id(vid), _rng(seed, day.isoformat(), "charger", i), t0, tz, fed=True)
            self.vehicles.append((vehicle, charger))
        self.pumps = [
            PumpModel(pump_id(p, i), _rng(seed, day.isoformat(), "pump", i), t0, tz) for i in range(1, PUMPS + 1)
        ]

    def tick(self, t: float) -> list[Outbound]:
        """Advance every device to `t`; the pump events raised on the way, then every device's report."""
        for meter in self.meters:
            meter.advance(t)
        out: list[Outbound] = []
        for vehicle, charger in self.vehicles:
            _, ac_kwh = vehicle.advance(t)
            charger.feed(t, ac_kwh, vehicle.ac_kw)
        for pump in self.pumps:
            out += pump.advance(t)
        out += [m.reading() for m in self.meters]
        for vehicle, charger in self.vehicles:
            out += [vehicle.reading(), charger.reading()]
        out += [pump.status() for pump in self.pumps]
        return out


def _stamp(message: Outbound) -> float:
    return float(message.payload["timestamp"]) / 1000.0


def messages(spec: Spec, win: Window) -> Iterator[Outbound]:
    """Every message of the window, in time order: pure, the same on every call."""
    day = datetime.fromtimestamp(win.start, spec.tz).date()
    last = datetime.fromtimestamp(win.end, spec.tz).date()
    while day <= last:
        fleet = DayFleet(spec, day)
        day_end = min(midnight(day + timedelta(days=1), spec.tz), win.end)
        chargers = {charger.id for _, charger in fleet.vehicles}
        registered: set[str] = set()
        k = 1
        while (t := fleet.t0 + k * spec.step) <= day_end + 1e-6:
            k += 1
            out = fleet.tick(t)
            if t <= win.start:
                continue  # simulated all the same, so later readings match a run that loads them
            for m in out:
                if not win.start < _stamp(m) <= win.end:
                    continue
                if m.kind == "meter" and (m.device_id in chargers or m.device_id not in registered):
                    # A charger's meter reports interval kWh only, as EIE's meters did. A site meter's
                    # first reading of a day (or of the window) carries no register: its predecessor
                    # comes from another day's simulation, or from nothing, so a register difference
                    # would be meaningless; the bridge counts that interval from kwhConsumedAc.
                    registered.add(m.device_id)
                    m = Outbound(m.kind, m.device_id, m.channel, _without(m.payload, "energyTotalKwh"))
                yield m
        day += timedelta(days=1)


def _without(payload: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in payload.items() if k != key}


# ---- publishing ------------------------------------------------------------------------------------


def broker_url(url: MqttUrl) -> str:
    """The broker's address without credentials, for messages."""
    return f"{'mqtts' if url.tls else 'mqtt'}://{url.host}:{url.port}"


class Publisher:
    """One MQTT 3.1.1 connection publishing at QoS 1 with at most `inflight` messages unacknowledged.

    A connection lost half-way is not resumed: the run fails, and running it again is harmless.
    """

    def __init__(self, url: MqttUrl, client_id: str, inflight: int = 200) -> None:
        from bridge.mqtt import make_client

        self.url, self.inflight = url, inflight
        self.client = make_client(url, client_id, mqtt.MQTTv311)
        self.client.max_inflight_messages_set(inflight)
        self.client.on_connect = self._connected
        self.client.on_disconnect = self._disconnected
        self._connected_event = threading.Event()
        self._lost = False
        self._pending: deque[mqtt.MQTTMessageInfo] = deque()
        self.sent = 0

    def _connected(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if not reason.is_failure:
            self._connected_event.set()

    def _disconnected(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if self._connected_event.is_set():
            self._lost = True

    def where(self) -> str:
        return broker_url(self.url)

    def connect(self, timeout: float = 15.0) -> None:
        try:  # a blocking connect: a refused connection fails now, not after the timeout
            self.client.connect(self.url.host, self.url.port, keepalive=30)
        except (OSError, ValueError) as exc:
            raise BrokerUnavailable(f"cannot reach the broker at {self.where()}: {exc}") from exc
        self.client.loop_start()
        if not self._connected_event.wait(timeout):
            self.close()
            raise BrokerUnavailable(f"the broker at {self.where()} did not accept a connection within {timeout:g} s")

    def publish(self, topic: str, payload: bytes) -> None:
        while len(self._pending) >= self.inflight:
            self._wait(self._pending.popleft())
        if self._lost:
            raise self._lost_error()
        info = self.client.publish(topic, payload, qos=1)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise self._lost_error()
        self._pending.append(info)
        self.sent += 1

    def flush(self, timeout: float = 60.0) -> None:
        """Wait for the PUBACK of everything published."""
        deadline = time.monotonic() + timeout
        while self._pending:
            self._wait(self._pending.popleft(), max(0.0, deadline - time.monotonic()))

    def _wait(self, info: mqtt.MQTTMessageInfo, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                info.wait_for_publish(min(1.0, max(0.0, deadline - time.monotonic())))
                if info.is_published():
                    return
            except RuntimeError as exc:
                raise self._lost_error() from exc
            if self._lost:
                raise self._lost_error()
            if time.monotonic() >= deadline:
                raise BrokerUnavailable(f"the broker at {self.where()} did not acknowledge within {timeout:g} s")

    def _lost_error(self) -> BrokerUnavailable:
        return BrokerUnavailable(
            f"lost the broker at {self.where()} after {self.sent} messages; run the same command again "
            "(repeats are stored once)"
        )

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# ---- correlations ---------------------------------------------------------------------------------


def post_correlations(api: str, token: str | None, pairs: list[dict[str, str]]) -> list[str]:
    """POST each pair to `/v1/ingestion/correlate`; one line per pair (201 new, 200 already known)."""
    url = api.rstrip("/") + "/v1/ingestion/correlate"
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    lines = []
    for pair in pairs:
        request = urllib.request.Request(url, data=orjson.dumps(pair), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=15) as response:
                status = response.status
        except urllib.error.HTTPError as exc:
            body = exc.read()[:500].decode(errors="replace")
            raise TelemetryError(f"POST {url} {pair} answered {exc.code}: {body}") from exc
        except (urllib.error.URLError, OSError) as exc:
            raise TelemetryError(f"POST {url}: {exc}") from exc
        what = "created" if status == 201 else "already known"
        lines.append(f"{pair['vehicleId']} → {pair['meterId']} ({status} {what})")
    return lines


def correlation_hint(pairs: list[dict[str, str]]) -> str:
    body = "\n".join(
        '  curl -X POST -H "Authorization: Bearer $API_TOKEN" -H "Content-Type: application/json" '
        f"-d '{json.dumps(p)}' \"$API_URL/v1/ingestion/correlate\""
        for p in pairs
    )
    return (
        "correlations not posted (no --api or API_URL): the efficiency of each EV needs its charger's meter;\n"
        f"run again with --api URL [--token T], or post them yourself:\n{body}"
    )


# ---- running it --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Summary:
    messages: int
    devices: int
    seconds: float
    by_kind: dict[str, int]

    def line(self, spec: Spec, win: Window, broker: str) -> str:
        rate = self.messages / self.seconds if self.seconds > 0 else 0.0
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(self.by_kind.items()))
        return (
            f"sample: {self.messages} messages ({kinds}) from {self.devices} devices, "
            f"{win.describe(spec.tz)} every {spec.step:g} s, seed {spec.seed}; "
            f"acknowledged by {broker} in {self.seconds:.1f} s ({rate:.0f} msg/s)"
        )


def load(spec: Spec, win: Window, url: MqttUrl, inflight: int = 200) -> Summary:
    """Publish the window's messages and wait until the broker has acknowledged every one (blocking)."""
    started = time.monotonic()
    publisher = Publisher(url, f"firmware-sim-sample-{os.getpid()}-{threading.get_ident() % 100000}", inflight)
    publisher.connect()
    by_kind: dict[str, int] = {}
    try:
        for m in messages(spec, win):
            publisher.publish(m.topic, orjson.dumps(m.payload))
            key = f"{m.kind} {m.channel}"
            by_kind[key] = by_kind.get(key, 0) + 1
        publisher.flush()
    finally:
        publisher.close()
    return Summary(publisher.sent, len(spec.device_ids()), time.monotonic() - started, by_kind)


def _day(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError("expected YYYY-MM-DD") from exc


def _hours(text: str) -> float:
    value = float(text)
    if not 0 < value <= 24 * 31:
        raise argparse.ArgumentTypeError("must be > 0 and at most 744 (31 days)")
    return value


def _step(text: str) -> float:
    value = float(text)
    if not 10 <= value <= 3600:
        raise argparse.ArgumentTypeError("must be between 10 and 3600 seconds")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="firmware-sim sample", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--day", type=_day, help="load this local day (YYYY-MM-DD; today: up to the block in progress)")
    p.add_argument("--hours", type=_hours, help="load only the last N hours of the window")
    p.add_argument("--end", help="end of the window, ISO-8601 (naive: SITE_TIMEZONE); default: the current block")
    p.add_argument("--step", type=_step, default=DEFAULT_STEP, help="seconds between reports (default 60)")
    p.add_argument("--seed", type=int, default=1, help="same seed, same data (default 1)")
    p.add_argument("--prefix", default="sample", help="device id prefix: sample → sample-meter-001 (default sample)")
    p.add_argument("--api", help="API base URL to post the EV ↔ charger correlations to (default: API_URL)")
    p.add_argument("--token", help="bearer token for --api (default: API_TOKEN, else the first of API_TOKENS)")
    p.add_argument("--inflight", type=_positive_int, default=200, help="unacknowledged messages at most (200)")
    p.add_argument("--log-level", default="WARNING")
    return p


def _end(text: str | None, tz: tzinfo) -> float | None:
    if text is None:
        return None
    try:
        ts = datetime.fromisoformat(text)
    except ValueError as exc:
        raise ValueError(f"--end: expected ISO-8601, got {text!r}") from exc
    return (ts if ts.tzinfo else ts.replace(tzinfo=tz)).timestamp()


def _token(args: argparse.Namespace, env: Mapping[str, str]) -> str | None:
    if args.token:
        return str(args.token)
    if env.get("API_TOKEN"):
        return env["API_TOKEN"]
    tokens = [t.strip() for t in (env.get("API_TOKENS") or "").split(",") if t.strip()]
    return tokens[0] if tokens else None


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        env = environment()
        settings = Settings.from_env(env)  # MQTT_URL (+ TLS files) and SITE_TIMEZONE, checked as everywhere
        tz: ZoneInfo = settings.site_timezone
        spec = Spec(seed=args.seed, prefix=args.prefix, step=args.step, tz=tz)
        win = window(tz, time.time(), day=args.day, hours=args.hours, end=_end(args.end, tz))
        _check_ids(spec)  # before connecting
        summary = load(spec, win, settings.mqtt, args.inflight)
        print(summary.line(spec, win, broker_url(settings.mqtt)))
        api = args.api or env.get("API_URL")
        pairs = spec.correlations()
        if api:
            for line in post_correlations(api, _token(args, env), pairs):
                print(f"correlated {line}")
        else:
            print(correlation_hint(pairs))
        print(look_at(spec))
    except (TelemetryError, ValueError) as exc:
        print(f"firmware-sim sample: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ValueError | ConfigError) else 1
    return 0


def look_at(spec: Spec) -> str:
    p = spec.prefix
    return (
        f"look at: GET /api/meters, /api/meters/{meter_id(p, 1)}/blocks/today, "
        f"/v1/analytics/performance/{vehicle_id(p, 1)} and …/{vehicle_id(p, FAULTY_VEHICLE)} (the faulty charger), "
        f"/api/v1/devices/status, /api/v1/devices/{pump_id(p, 1)}/history"
    )


def _check_ids(spec: Spec) -> None:
    from bridge import topics

    for device_id in spec.device_ids():
        if not topics.DEVICE_ID.match(device_id):
            raise ValueError(f"device id {device_id!r} must be 1-64 of [A-Za-z0-9_.:-]: change --prefix")
