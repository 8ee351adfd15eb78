"""The bridge's MQTT side: one network thread, acknowledging only what is committed.

The thread reads the socket in large chunks, splits them into packets (`bridge.packets`), decodes each
PUBLISH and appends it to a deque: no asyncio and no system call per message. The event loop is woken
once per batch (first message, or batch full). A PUBACK goes out only when `ack()` is called after the
batch's commit (all of a batch's PUBACKs in one write), so the broker keeps (and redelivers) anything
we have not stored. MQTT 5 lets us announce a large Receive Maximum; over 3.1.1 (amqtt) the broker's
own in-flight window applies. `make_client` (paho) serves everything else that speaks MQTT.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import selectors
import socket
import ssl
import threading
import time
import zlib
from collections import deque
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from . import packets, topics
from .config import MqttUrl, Settings
from .errors import BrokerUnavailable
from .telemetry import DeadLetter, Decoded, Decoder

log = logging.getLogger(__name__)

SESSION_EXPIRY_S = 7 * 24 * 3600
KEEPALIVE_S = 30
_TICK = timedelta(microseconds=1)
READ_SIZE = 256 * 1024
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


_NATIVE = frozenset(p.encode() for p in topics.PREFIX_TO_KIND)


def owner(topic: bytes, count: int) -> int:
    """Which of `count` partitioned bridges stores this message: a stable hash of the device id (the same
    in every process, unlike `hash()`); topics of adapted firmwares all go to partition 0."""
    prefix, _, rest = topic.partition(b"/")
    if prefix not in _NATIVE:
        return 0
    return zlib.crc32(rest.partition(b"/")[0]) % count


class MqttIngress:
    """Subscribes to every device topic and hands decoded messages to the writer in batches."""

    def __init__(self, settings: Settings, decoder: Decoder) -> None:
        self._settings = settings
        self._decoder = decoder
        self._buffer: deque[Decoded] = deque()
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connected = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None  # the connection acknowledgements may go to
        self._outbox: list[bytes] = []
        # PUBACKs go out in the order the PUBLISHes came (MQTT 3.1.1 and 5, §4.6): packet ids of QoS 1
        # messages not yet acknowledged, in arrival order, and those of them that may be. Mosquitto looks
        # an acknowledged id up from the oldest in-flight message on, so out-of-order acks cost it a scan
        # each (a partitioned bridge's immediate acks behind held messages made the broker CPU-bound).
        self._order: deque[int] = deque()
        self._done: set[int] = set()
        self._out_lock = threading.Lock()
        self._poke_r, self._poke_w = socket.socketpair()
        self._poke_r.setblocking(False)
        self._poke_w.setblocking(False)
        self._connack: int | None = None
        self._sub_id = 0
        self._pub_id = 0
        # at most this many decoded messages wait for the writer; past it the thread stops reading
        # the socket (see _serve)
        self._high_water = max(2 * settings.batch_size, min(settings.receive_maximum, 65535))
        self._paused = False  # shutting down: read nothing more
        self._holding = False  # the thread stopped reading for want of space
        self.generation = 0
        self.version = 5
        self.reconnects = 0
        self.received = 0

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def protocol(self) -> int:
        """The MQTT protocol level in use: 5, or 4 (3.1.1)."""
        return self.version

    async def __aenter__(self) -> MqttIngress:
        self._loop = asyncio.get_running_loop()
        wanted = self._settings.mqtt_protocol
        order = {"5": [5], "3.1.1": [4]}.get(wanted, [5, 4])
        last_error: Exception | None = None
        for version in order:
            # amqtt never answers an MQTT 5 CONNECT with properties: don't wait long before 3.1.1
            probing = version == 5 and len(order) > 1
            try:
                await self._start(version, wait=3.0 if probing else 10.0)
                return self
            except BrokerUnavailable as exc:
                last_error = exc
                await self._stop()
                if probing:
                    log.info("MQTT 5 connect failed (%s); trying MQTT 3.1.1", exc)
        assert last_error is not None
        raise last_error

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._stop()
        self._poke_r.close()
        self._poke_w.close()

    async def _start(self, version: int, wait: float) -> None:
        s = self._settings
        self.version = version
        self._connack = None
        self._connected.clear()
        self._stopping.clear()
        sock, rest = await asyncio.to_thread(self._handshake, version, wait)
        self._thread = threading.Thread(target=self._run, args=(sock, rest), name="mqtt-ingress", daemon=True)
        self._thread.start()
        # ready only once the broker confirmed the subscription: earlier publishes would not reach us
        if not await asyncio.to_thread(self._connected.wait, wait):
            raise BrokerUnavailable(f"no SUBACK from {s.mqtt.host}:{s.mqtt.port} within {wait:.0f} s")
        log.info(
            "connected to %s:%d over MQTT %s as %s",
            s.mqtt.host,
            s.mqtt.port,
            "5" if version == 5 else "3.1.1",
            s.client_id,
        )

    async def _stop(self) -> None:
        self._stopping.set()
        self._poke()
        thread, self._thread = self._thread, None
        if thread is not None:
            await asyncio.to_thread(thread.join, 10.0)
        self._connected.clear()

    def pause(self) -> None:
        """Read nothing more from the broker (shutdown: what is held is flushed, the rest stays queued)."""
        self._paused = True
        self._poke()

    # ---- the network thread ---------------------------------------------------------------

    def _handshake(self, version: int, timeout: float) -> tuple[socket.socket, bytes]:
        """Connect and wait for CONNACK; returns the socket and whatever the broker sent after it."""
        s = self._settings
        url = s.mqtt
        where = f"{url.host}:{url.port}"
        try:
            sock = socket.create_connection((url.host, url.port), timeout=timeout)
        except OSError as exc:
            raise BrokerUnavailable(f"cannot connect to {where}: {exc}") from exc
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            context = url.ssl_context()
            if context is not None:
                sock = context.wrap_socket(sock, server_hostname=url.host)
            sock.sendall(
                packets.connect(
                    s.client_id,
                    version=version,
                    keepalive=KEEPALIVE_S,
                    clean=False,
                    username=url.username,
                    password=url.password,
                    session_expiry=SESSION_EXPIRY_S,
                    receive_maximum=max(1, min(s.receive_maximum, 65535)),
                )
            )
            buf = bytearray()
            while (found := packets.first(buf)) is None:
                chunk = sock.recv(4096)
                if not chunk:
                    raise BrokerUnavailable(f"{where} closed the connection before CONNACK")
                buf += chunk
            packet, end = found
            if packet.kind != packets.CONNACK:
                raise packets.ProtocolError(f"expected CONNACK, got packet type {packet.kind}")
            _, code = packets.connack(packet.body, version)
            if code:
                self._connack = code
                raise BrokerUnavailable(f"{where} refused the connection (reason code {code})")
            sock.settimeout(KEEPALIVE_S)
            return sock, bytes(buf[end:])
        except TimeoutError as exc:
            sock.close()
            raise BrokerUnavailable(f"no CONNACK from {where} within {timeout:.0f} s") from exc
        except (OSError, packets.ProtocolError) as exc:
            sock.close()
            raise BrokerUnavailable(f"connecting to {where} failed: {exc}") from exc
        except BaseException:
            sock.close()
            raise

    def _run(self, sock: socket.socket | None, rest: bytes) -> None:
        delay = 1.0
        while not self._stopping.is_set():
            if sock is None:
                try:
                    sock, rest = self._handshake(self.version, 10.0)
                except BrokerUnavailable as exc:
                    log.warning("reconnecting to the broker failed: %s; next try in %.0f s", exc, delay)
                    self._stopping.wait(delay)
                    delay = min(2 * delay, 10.0)
                    continue
                self.reconnects += 1
                log.info("reconnected to the broker")
            delay = 1.0
            try:
                self._serve(sock, rest)
            except (OSError, packets.ProtocolError) as exc:  # timeouts and TLS errors are OSErrors too
                if not self._stopping.is_set():
                    log.warning("lost the broker connection (%s); reconnecting", exc)
            except Exception:  # a bug of ours: log it, and keep the bridge connected
                log.exception("MQTT ingress failed; reconnecting")
            finally:
                self._connected.clear()
                with self._out_lock:
                    self._sock = None
                    self._outbox.clear()  # acknowledgements for a closed connection mean nothing
                    self._order.clear()
                    self._done.clear()
                with contextlib.suppress(OSError):
                    sock.close()
                sock = None

    def _serve(self, sock: socket.socket, rest: bytes) -> None:
        version = self.version
        with self._out_lock:
            # messages held from the old connection are no longer ackable: the broker redelivers them
            self.generation += 1
            self._sock = sock
            self._sub_id = self._sub_id % 65535 + 1
        adapters = self._decoder.adapters
        subs = topics.subscriptions(self._settings.shared_group, adapters.subscriptions() if adapters else ())
        sock.sendall(packets.subscribe(self._sub_id, subs, version=version))
        buf = bytearray(rest)
        publishes: list[packets.Publish] = []
        others: list[packets.Packet] = []
        tls = isinstance(sock, ssl.SSLSocket)
        last_in = last_out = time.monotonic()
        with selectors.DefaultSelector() as selector:
            selector.register(self._poke_r, selectors.EVENT_READ)
            reading = False
            while True:
                if buf:
                    used = packets.split(buf, version, publishes, others)
                    if used:
                        del buf[:used]
                    if publishes:
                        self._take(publishes)
                        publishes.clear()
                    if others:
                        self._control(others)
                        others.clear()
                if self._stopping.is_set():
                    break
                # backpressure: past the high-water mark the socket is left unread, so the broker
                # keeps the rest (Mosquitto refills a whole Receive Maximum window on every PUBACK)
                want = not self._paused and len(self._buffer) < self._high_water
                self._holding = not want
                if want != reading:
                    if want:
                        selector.register(sock, selectors.EVENT_READ)
                        last_in = time.monotonic()
                    else:
                        selector.unregister(sock)
                    reading = want
                now = time.monotonic()
                for key, _ in selector.select(max(0.0, last_out + KEEPALIVE_S / 2 - now)):
                    if key.fileobj is self._poke_r:
                        with contextlib.suppress(BlockingIOError):
                            while self._poke_r.recv(4096):
                                pass
                        continue
                    chunk = sock.recv(READ_SIZE)
                    if not chunk:
                        raise ConnectionError("the broker closed the connection")
                    buf += chunk
                    while tls and sock.pending():  # type: ignore[attr-defined]
                        buf += sock.recv(READ_SIZE)
                    last_in = time.monotonic()
                out = self._take_outbox()
                now = time.monotonic()
                if now - last_out >= KEEPALIVE_S / 2:
                    out += packets.PING
                if out:
                    sock.sendall(out)
                    last_out = now
                if reading and now - last_in > 1.5 * KEEPALIVE_S:
                    raise TimeoutError(f"nothing from the broker for {now - last_in:.0f} s")
            sock.sendall(self._take_outbox() + packets.GOODBYE)

    def _take(self, publishes: list[packets.Publish]) -> None:
        """Decode and queue received PUBLISHes (the hot path: no asyncio, no system call per message)."""
        decode = self._decoder.decode
        buffer = self._buffer
        generation = self.generation
        size = self._settings.batch_size
        loop = self._loop
        wake = self._wake.set
        dropped: list[int] = []
        arrived: list[int] = []
        partition = self._settings.partition
        received = datetime.now(UTC)  # these came in one read from the socket: one clock read for all
        tick = _TICK
        for raw_topic, payload, qos, retain, pid in publishes:
            # each a microsecond after the one before, in arrival order: a payload without a timestamp is
            # stamped with its arrival, and two of one device's in one read would otherwise be one row
            received += tick
            if qos:
                arrived.append(pid)
            if partition is not None and owner(raw_topic, partition[1]) != partition[0]:
                if qos:
                    dropped.append(pid)  # another bridge of the partition set stores it, from its own session
                continue
            try:
                topic = raw_topic.decode()
            except UnicodeDecodeError:
                topic = repr(raw_topic)
            try:
                item = decode(topic, payload, received, retain)
            except Exception as exc:  # a decoder bug must not kill the thread or lose the message
                log.exception("decoding %s failed", topic)
                item = DeadLetter(topic, payload, f"internal error while decoding: {exc!r}", received)
            if item is None:
                if qos:
                    dropped.append(pid)
                continue
            item.mid = pid
            item.generation = generation
            buffer.append(item)
            n = len(buffer)
            # wake the writer once per batch (first message, batch full), never per message
            if (n == 1 or n == size) and loop is not None:
                loop.call_soon_threadsafe(wake)
        self.received += len(publishes)
        with self._out_lock:
            self._order.extend(arrived)
            if dropped:
                self._done.update(dropped)
                self._release()

    def _release(self) -> None:
        """Queue PUBACKs for the oldest unacknowledged messages that may be acknowledged (lock held)."""
        order, done = self._order, self._done
        ready: list[int] = []
        while order and order[0] in done:
            pid = order.popleft()
            done.discard(pid)
            ready.append(pid)
        if ready:
            self._outbox.append(packets.pubacks(ready))

    def _control(self, others: list[packets.Packet]) -> None:
        for packet in others:
            if packet.kind == packets.SUBACK:
                pid, codes = packets.suback(packet.body, self.version)
                if pid == self._sub_id:
                    failed = [c for c in codes if c >= 0x80]
                    if failed:
                        log.error("broker refused subscriptions: reason codes %s", failed)
                    self._connected.set()
            elif packet.kind == packets.DISCONNECT:
                code = packet.body[0] if packet.body else 0
                raise ConnectionError(f"the broker disconnected us (reason code {code:#04x})")
            elif packet.kind not in (packets.PINGRESP, packets.PUBACK):
                log.debug("ignoring MQTT packet type %d", packet.kind)

    def _take_outbox(self) -> bytes:
        with self._out_lock:
            out, self._outbox = self._outbox, []
        return b"".join(out)

    def _poke(self) -> None:
        with contextlib.suppress(OSError):  # full: the thread is already due to wake; closed: stopping
            self._poke_w.send(b"\0")

    def _send(self, data: bytes) -> bool:
        with self._out_lock:
            if self._sock is None or not self._connected.is_set():
                return False
            self._outbox.append(data)
        self._poke()
        return True

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
        # from the oldest message's arrival, not from now: what came in while the last batch was being
        # written has waited already (lingering again cost every message ~flush_interval at 5k msg/s)
        waited = (datetime.now(UTC) - self._buffer[0].received_at).total_seconds()
        deadline = time.monotonic() + interval - max(0.0, waited)
        while len(self._buffer) < size and not self._holding:
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
        if self._holding:
            self._poke()  # there is room again: the thread may read the socket
        return batch

    def publish(self, topic: str, payload: bytes, qos: int = 0) -> None:
        """Publish our own notes and alerts; dropped while disconnected (the database holds what they say).

        At QoS 1 the broker's PUBACK is not waited for, and nothing is resent after a reconnect.
        """
        if qos:
            self._pub_id = self._pub_id % 65535 + 1
        self._send(packets.publish(topic, payload, version=self.version, qos=min(qos, 1), packet_id=self._pub_id))

    def ack(self, items: Sequence[Decoded]) -> None:
        """PUBACK every message of a committed batch that came on the current connection, in one write."""
        with self._out_lock:
            if self._sock is None:
                return
            generation = self.generation
            self._done.update(item.mid for item in items if item.mid and item.generation == generation)
            queued = len(self._outbox)
            self._release()
            if len(self._outbox) == queued:
                return
        self._poke()
