"""Simulated devices on the wire: one MQTT 3.1.1 connection per device, driven by `model.Fleet`.

Each device needs its own connection because presence is per client: the will (`…/{id}/online` =
`offline`, retained, QoS 1) is what tells the bridge a device vanished. MQTT 3.1.1 everywhere,
because the demo broker (amqtt) speaks nothing newer and the devices need nothing MQTT 5 adds:
results always go to `…/{id}/cmd/result` with the command's `commandId`.

paho runs one network thread per device; the fleet model is only touched from the event loop
(commands are handed over with `call_soon_threadsafe`), so it needs no locks.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from types import TracebackType
from typing import Any

import orjson
import paho.mqtt.client as mqtt

from bridge import topics
from bridge.config import DEFAULT_MQTT_URL, MqttUrl
from bridge.errors import BrokerUnavailable
from bridge.mqtt import make_client
from bridge.topics import Kind

from .model import Fleet, FleetSpec, Outbound, SimClock, default_history

log = logging.getLogger(__name__)

CommandHandler = Callable[[Kind, str, bytes], None]


class DeviceLink:
    """One device's own connection: its will, its retained presence, its command subscription."""

    def __init__(self, url: MqttUrl, kind: Kind, device_id: str, on_command: CommandHandler) -> None:
        self.url, self.kind, self.device_id = url, kind, device_id
        self.online_topic = topics.device_topic(kind, device_id, "online")
        self.cmd_topic = topics.device_topic(kind, device_id, "cmd")
        self._on_command = on_command
        self.connected = threading.Event()
        # a real device connects under its own id; two simulations with one prefix would fight over it
        self.client = make_client(url, device_id, mqtt.MQTTv311)
        self.client.will_set(self.online_topic, b"offline", qos=1, retain=True)
        self.client.on_connect = self._connected
        self.client.on_disconnect = self._disconnected
        self.client.on_message = self._message

    def start(self) -> None:
        self.client.connect_async(self.url.host, self.url.port, keepalive=30)
        self.client.loop_start()

    def _connected(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            log.warning("%s: broker refused the connection: %s", self.device_id, reason)
            return
        # on every (re)connect: the subscription is gone with the clean session, the will may have fired
        client.subscribe(self.cmd_topic, qos=1)
        client.publish(self.online_topic, b"online", qos=1, retain=True)
        self.connected.set()

    def _disconnected(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self.connected.clear()

    def _message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if message.topic == self.cmd_topic:
            self._on_command(self.kind, self.device_id, bytes(message.payload))

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> mqtt.MQTTMessageInfo:
        # paho queues QoS 1 messages while disconnected and sends them after reconnecting
        return self.client.publish(topic, payload, qos=1, retain=retain)

    def say_offline(self) -> mqtt.MQTTMessageInfo | None:
        if not self.connected.is_set():
            return None  # the broker publishes our will instead
        return self.publish(self.online_topic, b"offline", retain=True)

    def disconnect(self) -> None:
        self.client.disconnect()

    def join(self) -> None:
        self.client.loop_stop()


@dataclass(frozen=True)
class SimConfig:
    """What to simulate; the CLI options of `firmware-sim` map one to one."""

    mqtt: MqttUrl = field(default_factory=lambda: MqttUrl.parse(DEFAULT_MQTT_URL))
    meters: int = 2
    vehicles: int = 1
    pumps: int = 1
    interval: float = 5.0  # real seconds between reports
    speed: float = 1.0  # simulated seconds per real second
    seed: int = 1
    faulty: float = 0.0
    duration: float | None = None  # real seconds; None runs until stopped
    prefix: str = "sim"
    history: float | None = None  # simulated seconds before now to start at; None: model.default_history
    tz: tzinfo = UTC  # the site's zone: the daily load shape follows local hours
    connect_timeout: float = 15.0

    def fleet_spec(self) -> FleetSpec:
        return FleetSpec(
            meters=self.meters,
            vehicles=self.vehicles,
            pumps=self.pumps,
            seed=self.seed,
            faulty=self.faulty,
            prefix=self.prefix,
            tz=self.tz,
        )


class Simulation:
    """The fleet on MQTT. `async with Simulation(config) as sim: await sim.run(stop)`.

    Entering connects every device (and publishes `online`); leaving publishes `offline` for each and
    disconnects. `correlations` is known before connecting.
    """

    def __init__(self, config: SimConfig) -> None:
        if not config.interval >= 0.01:
            raise ValueError("interval must be at least 0.01 s")
        if not config.speed > 0:
            raise ValueError("speed must be > 0")
        if config.duration is not None and not config.duration > 0:
            raise ValueError("duration must be > 0")
        if config.history is not None and not config.history >= 0:
            raise ValueError("history must be >= 0")
        self.config = config
        history = default_history(config.speed, config.duration) if config.history is None else config.history
        self.clock = SimClock.starting(time.time(), config.speed, history)
        self._origin = time.monotonic()
        self.fleet = Fleet(config.fleet_spec(), self.clock.start)
        self.links: dict[tuple[Kind, str], DeviceLink] = {
            (kind, device_id): DeviceLink(config.mqtt, kind, device_id, self._command_received)
            for kind, device_id in self.fleet.devices()
        }
        self.published = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    @property
    def correlations(self) -> list[dict[str, str]]:
        return self.fleet.correlations()

    @property
    def device_ids(self) -> list[str]:
        return [device_id for _, device_id in self.links]

    def sim_time(self, elapsed: float | None = None) -> float:
        if elapsed is None:
            elapsed = time.monotonic() - self._origin
        return self.clock.at(elapsed, time.time())

    async def __aenter__(self) -> Simulation:
        self._loop = asyncio.get_running_loop()
        for link in self.links.values():
            link.start()
        if not await asyncio.to_thread(self._wait_connected, self.config.connect_timeout):
            missing = [link.device_id for link in self.links.values() if not link.connected.is_set()]
            await asyncio.to_thread(self._close_links, 0.0)
            u = self.config.mqtt
            raise BrokerUnavailable(f"{len(missing)} devices could not connect to {u.host}:{u.port}: {missing[:5]}")
        start = datetime.fromtimestamp(self.clock.start, UTC).isoformat(timespec="seconds")
        log.info("%d devices connected; simulated time starts at %s", len(self.links), start)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def _wait_connected(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        return all(link.connected.wait(max(0.0, deadline - time.monotonic())) for link in self.links.values())

    async def run(self, stop: asyncio.Event | None = None, duration: float | None = None) -> None:
        """Report every `interval` until `stop` is set or `duration` (default: the config's) has passed."""
        interval = self.config.interval
        duration = self.config.duration if duration is None else duration
        stop = stop or asyncio.Event()
        started = time.monotonic()
        k = 0
        while not stop.is_set():
            k += 1
            if duration is not None and k * interval > duration + 1e-9:
                break
            deadline = started + k * interval
            try:
                await asyncio.wait_for(stop.wait(), max(0.0, deadline - time.monotonic()))
                break
            except TimeoutError:
                pass
            # nominal times, not measured ones: timestamps advance exactly interval * speed per tick
            self._send(self.fleet.tick(self.sim_time(deadline - self._origin)))

    def _send(self, messages: list[Outbound]) -> None:
        for m in messages:
            self.links[(m.kind, m.device_id)].publish(m.topic, orjson.dumps(m.payload))
        self.published += len(messages)

    def _command_received(self, kind: Kind, device_id: str, payload: bytes) -> None:
        """Runs in the device's paho thread: hand the command to the event loop."""
        loop = self._loop
        if loop is None or self._closed:
            return
        try:
            loop.call_soon_threadsafe(self._command, kind, device_id, payload)
        except RuntimeError:  # the loop is closing
            pass

    def _command(self, kind: Kind, device_id: str, payload: bytes) -> None:
        try:
            data = orjson.loads(payload)
        except orjson.JSONDecodeError:
            log.warning("%s: ignoring a command that is not JSON: %r", device_id, payload[:200])
            return
        out = self.fleet.command(kind, device_id, data, self.sim_time())
        if not out:
            log.warning("%s: ignoring a command without commandId: %r", device_id, payload[:200])
        self._send(out)

    async def close(self) -> None:
        """Publish `offline` (retained) for every device, then disconnect them all."""
        if self._closed:
            return
        self._closed = True
        await asyncio.to_thread(self._close_links, 10.0)
        log.info("stopped after %d messages", self.published)

    def _close_links(self, timeout: float) -> None:
        # every `offline` goes out first and is waited for together: one round trip, not one per device
        pending = [(link, link.say_offline()) for link in self.links.values()]
        deadline = time.monotonic() + timeout
        for link, info in pending:
            if info is None:
                continue
            try:
                info.wait_for_publish(max(0.0, deadline - time.monotonic()))
            except (RuntimeError, ValueError) as exc:
                log.warning("%s: offline not delivered: %s", link.device_id, exc)
        # all disconnects first: each network thread then winds down in parallel
        for link in self.links.values():
            link.disconnect()
        for link in self.links.values():
            link.join()


async def simulate(config: SimConfig, stop: asyncio.Event | None = None) -> None:
    """Connect, run until `stop` (or the configured duration), disconnect: for an embedding program."""
    async with Simulation(config) as sim:
        await sim.run(stop)
