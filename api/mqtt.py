"""The API's MQTT link (aiomqtt): publishes readings and commands, listens to what the bridge committed.

It reconnects by itself; while it is down, publishing raises `Unavailable` (HTTP 503). The API is a
low-rate client, so aiomqtt's per-message asyncio cost does not matter here (the bridge uses paho).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

import aiomqtt
import orjson
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bridge import committed
from bridge.config import MqttUrl

from .errors import Unavailable

log = logging.getLogger(__name__)
Listener = Callable[[str, Any], Awaitable[None]]


class MqttLink:
    def __init__(self, url: MqttUrl, client_id: str, protocol: str = "auto", *, extra_topics: tuple[str, ...] = ()):
        self._url = url
        self._client_id = client_id
        self._protocol = protocol
        self._topics = (committed.TOPIC, *extra_topics)
        self._client: aiomqtt.Client | None = None
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._listeners: list[Listener] = []
        self.v5 = protocol != "3.1.1"
        self.reconnects = 0

    def listen(self, listener: Listener) -> None:
        """`listener(topic, parsed JSON)` for every message on our subscriptions."""
        self._listeners.append(listener)

    @property
    def connected(self) -> bool:
        return self._ready.is_set()

    async def __aenter__(self) -> MqttLink:
        self._task = asyncio.create_task(self._run(), name="api-mqtt")
        # start serving even if the broker is down; requests needing it answer 503 until it is back
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ready.wait(), 5)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _make(self, v5: bool) -> aiomqtt.Client:
        u = self._url
        return aiomqtt.Client(
            u.host,
            u.port,
            username=u.username,
            password=u.password,
            identifier=self._client_id,
            protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
            tls_context=u.ssl_context(),
            timeout=10,
        )

    async def _run(self) -> None:
        delay = 0.5
        while True:
            try:
                async with self._make(self.v5) as client:
                    self._client = client
                    for topic in self._topics:
                        await client.subscribe(topic, qos=0)
                    self._ready.set()
                    delay = 0.5
                    async for message in client.messages:
                        await self._dispatch(str(message.topic), message.payload)
            except aiomqtt.MqttError as exc:
                if self.v5 and self._protocol == "auto" and not self._ready.is_set() and self.reconnects == 0:
                    log.info("MQTT 5 refused (%s); using MQTT 3.1.1", exc)
                    self.v5 = False
                    continue
                log.warning("MQTT link lost (%s); reconnecting in %.1f s", exc, delay)
            finally:
                self._client = None
                if self._ready.is_set():
                    self.reconnects += 1
                self._ready.clear()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

    async def _dispatch(self, topic: str, payload: Any) -> None:
        try:
            data = orjson.loads(payload) if isinstance(payload, bytes | bytearray | str) else payload
        except orjson.JSONDecodeError:
            data = payload
        for listener in self._listeners:
            try:
                await listener(topic, data)
            except Exception:  # one broken listener must not stop the others or the link
                log.exception("listener failed for %s", topic)

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        response_topic: str | None = None,
        correlation: bytes | None = None,
    ) -> None:
        """Publish and, at QoS 1, return once the broker's PUBACK arrived."""
        client = self._client
        if client is None or not self._ready.is_set():
            raise Unavailable("the MQTT broker is not reachable")
        props = None
        if self.v5 and (response_topic or correlation):
            props = Properties(PacketTypes.PUBLISH)
            if response_topic:
                props.ResponseTopic = response_topic
            if correlation:
                props.CorrelationData = correlation
        try:
            await asyncio.wait_for(client.publish(topic, payload, qos=qos, retain=retain, properties=props), 10)
        except (aiomqtt.MqttError, TimeoutError) as exc:
            raise Unavailable(f"the broker did not accept the message: {exc}") from exc
