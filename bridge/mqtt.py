"""The bridge's MQTT side: paho in its own network thread, acknowledging only what is committed.

paho's `on_message` runs in paho's thread and only decodes and appends to a deque: no asyncio per
message. The event loop is woken once per batch (first message, or batch full), not per message.
With `manual_ack=True` the PUBACK goes out only when `ack()` is called after the batch's commit, so
the broker keeps (and redelivers) anything we have not stored. MQTT 5 lets us announce a large
Receive Maximum; over 3.1.1 (amqtt) the broker's own in-flight window applies.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from . import topics
from .config import MqttUrl, Settings
from .errors import BrokerUnavailable
from .telemetry import DeadLetter, Decoded, Decoder

log = logging.getLogger(__name__)

SESSION_EXPIRY_S = 7 * 24 * 3600
# CONNACK codes that mean "this broker does not speak MQTT 5": 3.1.1's 1 and MQTT 5's 0x84
_UNSUPPORTED_PROTOCOL = {1, 0x84}


def make_client(
    url: MqttUrl, client_id: str, protocol: MQTTProtocolVersion, *, manual_ack: bool = False, clean: bool = True
) -> mqtt.Client:
    """A paho client for our broker URL (TLS and credentials included)."""
    kwargs: dict[str, Any] = {}
    if protocol != mqtt.MQTTv5:
        kwargs["clean_session"] = clean
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=protocol,
        manual_ack=manual_ack,
        **kwargs,
    )
    if url.username:
        client.username_pw_set(url.username, url.password)
    context = url.ssl_context()
    if context is not None:
        client.tls_set_context(context)
    client.reconnect_delay_set(min_delay=1, max_delay=10)
    return client


class MqttIngress:
    """Subscribes to every device topic and hands decoded messages to the writer in batches."""

    def __init__(self, settings: Settings, decoder: Decoder) -> None:
        self._settings = settings
        self._decoder = decoder
        self._buffer: deque[Decoded] = deque()
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: mqtt.Client | None = None
        self._connected = threading.Event()
        self._connack: int | None = None
        self._sub_mid: int | None = None
        # at most this many decoded messages wait for the writer (see _hold_back)
        self._high_water = max(2 * settings.batch_size, min(settings.receive_maximum, 65535))
        self._space = threading.Condition()
        self._waiting = False
        self.generation = 0
        self.protocol: MQTTProtocolVersion = mqtt.MQTTv5
        self.reconnects = 0
        self.received = 0

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def __aenter__(self) -> MqttIngress:
        self._loop = asyncio.get_running_loop()
        wanted = self._settings.mqtt_protocol
        order = {"5": [mqtt.MQTTv5], "3.1.1": [mqtt.MQTTv311]}.get(wanted, [mqtt.MQTTv5, mqtt.MQTTv311])
        last_error: Exception | None = None
        for protocol in order:
            try:
                # amqtt never answers an MQTT 5 CONNECT with properties: don't wait long before 3.1.1
                probing = protocol == mqtt.MQTTv5 and len(order) > 1
                await self._start(protocol, wait=3.0 if probing else 10.0)
                return self
            except BrokerUnavailable as exc:
                last_error = exc
                self._stop()
                if self._connack not in _UNSUPPORTED_PROTOCOL and protocol == mqtt.MQTTv5 and len(order) > 1:
                    # no CONNACK at all (amqtt), or the socket closed: try 3.1.1 too
                    log.info("MQTT 5 connect failed (%s); trying MQTT 3.1.1", exc)
        assert last_error is not None
        raise last_error

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop()

    async def _start(self, protocol: MQTTProtocolVersion, wait: float = 10.0) -> None:
        s = self._settings
        self.protocol = protocol
        self._connack = None
        self._connected.clear()
        client = make_client(s.mqtt, s.client_id, protocol, manual_ack=True, clean=False)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        props = None
        if protocol == mqtt.MQTTv5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = SESSION_EXPIRY_S
            props.ReceiveMaximum = min(s.receive_maximum, 65535)
        self._client = client
        try:
            if protocol == mqtt.MQTTv5:
                await asyncio.to_thread(
                    client.connect, s.mqtt.host, s.mqtt.port, 30, clean_start=False, properties=props
                )
            else:
                await asyncio.to_thread(client.connect, s.mqtt.host, s.mqtt.port, 30)
        except OSError as exc:
            raise BrokerUnavailable(f"cannot connect to {s.mqtt.host}:{s.mqtt.port}: {exc}") from exc
        client.loop_start()
        ok = await asyncio.to_thread(self._connected.wait, wait)
        if not ok:
            code = self._connack
            raise BrokerUnavailable(
                f"no CONNACK from {s.mqtt.host}:{s.mqtt.port}" + (f" (reason code {code})" if code else "")
            )
        log.info(
            "connected to %s:%d over MQTT %s as %s",
            s.mqtt.host,
            s.mqtt.port,
            "5" if protocol == mqtt.MQTTv5 else "3.1.1",
            s.client_id,
        )

    def _stop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.disconnect()
            client.loop_stop()
        self._connected.clear()

    # ---- paho's thread --------------------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            self._connack = reason.value
            log.warning("broker refused the connection: %s", reason)
            return
        if self.generation:
            self.reconnects += 1
        # messages buffered on the old connection are no longer ackable there; the broker redelivers them
        self.generation += 1
        adapters = self._decoder.adapters
        subs = topics.subscriptions(self._settings.shared_group, adapters.subscriptions() if adapters else ())
        if self.protocol == mqtt.MQTTv5:
            _, self._sub_mid = client.subscribe([(t, SubscribeOptions(qos=1)) for t in subs])
        else:
            _, self._sub_mid = client.subscribe([(t, 1) for t in subs])

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, properties: Any) -> None:
        # ready only once the broker confirmed the subscription: earlier publishes would not reach us
        if mid == self._sub_mid:
            failed = [r for r in reasons if r.is_failure]
            if failed:
                log.error("broker refused subscriptions: %s", failed)
            self._connected.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self._connected.clear()
        if self._client is client:
            log.warning("disconnected from the broker (%s); paho reconnects", reason)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        received = datetime.now(UTC)
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            topic = repr(msg._topic)
        payload = bytes(msg.payload)
        try:
            item = self._decoder.decode(topic, payload, received, bool(msg.retain))
        except Exception as exc:  # a decoder bug must not kill paho's thread or lose the message
            log.exception("decoding %s failed", topic)
            item = DeadLetter(topic, payload, f"internal error while decoding: {exc!r}", received)
        self.received += 1
        if item is None:
            if msg.qos:
                client.ack(msg.mid, msg.qos)
            return
        item.mid = msg.mid if msg.qos else 0
        item.generation = self.generation
        self._buffer.append(item)
        n = len(self._buffer)
        # wake the writer once per batch (first message, batch full), never per message
        if (n == 1 or n == self._settings.batch_size) and self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake.set)
        if n >= self._high_water:
            self._hold_back()

    def _hold_back(self) -> None:
        """Stop reading from the broker until the writer has caught up.

        Mosquitto 2.0.11 refills the whole Receive Maximum window on every PUBACK, so the window alone
        does not bound what we hold. Blocking paho's network thread here leaves the rest in the broker
        (TCP backpressure): memory stays bounded. The writer drains the buffer without needing this
        thread, and our PUBACKs go out once it resumes.
        """
        with self._space:
            self._waiting = True
            while len(self._buffer) > self._high_water // 2 and self._client is not None:
                self._space.wait(0.5)
            self._waiting = False

    # ---- the event loop's side -------------------------------------------------------------

    def pending(self) -> int:
        return len(self._buffer)

    def oldest(self) -> datetime | None:
        try:
            return self._buffer[0].received_at
        except IndexError:
            return None

    async def next_batch(self, timeout: float) -> list[Decoded]:  # noqa: ASYNC109
        """Up to `batch_size` messages, once the batch is full or its first message waited `flush_interval`."""
        size, interval = self._settings.batch_size, self._settings.flush_interval
        if not self._buffer:
            self._wake.clear()
            if not self._buffer:
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout)
                except TimeoutError:
                    return []
        deadline = time.monotonic() + interval
        while len(self._buffer) < size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except TimeoutError:
                break
        n = min(size, len(self._buffer))
        batch = [self._buffer.popleft() for _ in range(n)]
        if self._waiting:
            with self._space:
                self._space.notify_all()
        return batch

    def publish(self, topic: str, payload: bytes, qos: int = 0) -> None:
        client = self._client
        if client is not None and self._connected.is_set():
            client.publish(topic, payload, qos=qos)

    def ack(self, items: Sequence[Decoded]) -> None:
        client = self._client
        if client is None:
            return
        generation = self.generation
        for item in items:
            if item.mid and item.generation == generation:
                client.ack(item.mid, 1)
