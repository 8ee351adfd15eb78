"""A load-generating device fleet: one process, one MQTT 3.1.1 connection, QoS 1 meter readings.

It speaks MQTT on a raw socket (pre-encoded PUBLISH packets written in chunks, PUBACKs counted as
they come back) because paho costs ~30 µs a message in Python and the publishers share the two cores
with the system under test. Each message carries its publish time as the reading's `timestamp`
(ISO-8601, microseconds), strictly increasing within the process, so that (meter_id, ts) is unique
for every message and latency can be read back from what was stored.

    python -m bench.publisher --port P --prefix bm1-0 --meters 1000 --count 100000 [--rate 5000]

prints one JSON line: published, acked, first/last publish time (epoch s), per-meter counts.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import select
import signal
import socket
import sys
import time
from datetime import UTC, datetime

WINDOW = 5000  # unacknowledged PUBLISHes in flight
CHUNK = 250  # messages per socket write


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _str(s: bytes) -> bytes:
    return len(s).to_bytes(2, "big") + s


def connect(host: str, port: int, client_id: str) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # clean session, keepalive 0: we never idle long enough to need PINGREQ
    body = _str(b"MQTT") + bytes([4, 0x02, 0, 0]) + _str(client_id.encode())
    sock.sendall(b"\x10" + _varint(len(body)) + body)
    ack = _recv_exact(sock, 4)
    if ack[0] != 0x20 or ack[3] != 0:
        raise RuntimeError(f"CONNACK refused: {ack!r}")
    sock.setblocking(False)
    return sock


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        part = sock.recv(n - len(buf))
        if not part:
            raise RuntimeError("broker closed the connection")
        buf += part
    return buf


def publish_packet(topic: bytes, packet_id: int, payload: bytes) -> bytes:
    rest = _str(topic) + packet_id.to_bytes(2, "big") + payload
    return b"\x32" + _varint(len(rest)) + rest


def payload(power: float, ts_us: int) -> bytes:
    stamp = datetime.fromtimestamp(ts_us / 1e6, UTC).isoformat(timespec="microseconds")
    return _head(power) + stamp.encode() + b'"}'


def _head(power: float) -> bytes:
    return b'{"totalPowerKw":%.3f,"voltage":230.4,"current":%.2f,"frequency":50.01,"powerFactor":0.97,"timestamp":"' % (
        power,
        power * 4.35,
    )


POWERS = 400  # distinct power values the fleet cycles through


class Packets:
    """PUBLISH packets built from pre-encoded pieces: per message only the packet id and the time change.

    The publishers share the machine with what they measure, so each µs here is taken from the bridge;
    `publish_packet(topic, id, payload(...))` is the plain form, and the same bytes (tested).
    """

    def __init__(self, topics: list[bytes]) -> None:
        self._topics = [_str(t) for t in topics]
        self._heads = [_head(10.0 + i / 10) for i in range(POWERS)]
        self._second = -1
        self._date = b""
        self._lengths: dict[int, bytes] = {}

    def build(self, meter: int, packet_id: int, seq: int, ts_us: int) -> bytes:
        second, micros = divmod(ts_us, 1_000_000)
        if second != self._second:  # the date and time to the second: once a second
            self._second = second
            self._date = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S").encode()
        body = b'%s%s.%06d+00:00"}' % (self._heads[seq % POWERS], self._date, micros)
        topic = self._topics[meter]
        n = len(topic) + 2 + len(body)
        length = self._lengths.get(n)
        if length is None:
            length = self._lengths[n] = b"\x32" + _varint(n)
        return length + topic + packet_id.to_bytes(2, "big") + body


class Acks:
    """Counts PUBACKs from a non-blocking socket (the broker sends nothing else to a publisher)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.count = 0
        self._partial = b""

    def read(self, wait: float = 0.0) -> None:
        if wait > 0:
            select.select([self.sock], [], [], wait)
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return
            if not data:
                raise RuntimeError("broker closed the connection")
            data = self._partial + data
            whole = len(data) // 4 * 4
            self._partial = data[whole:]
            # PUBACK is 0x40 0x02 <id>: four bytes each
            self.count += whole // 4


_stop = False
TICK_S = 0.002


def _on_term(signum: int, frame: object) -> None:
    global _stop
    _stop = True  # stop publishing; what is in flight is still acknowledged and reported


def run(args: argparse.Namespace) -> dict[str, object]:
    signal.signal(signal.SIGTERM, _on_term)
    sock = connect(args.host, args.port, f"{args.prefix}-{os.getpid()}")
    acks = Acks(sock)
    topics = [f"meters/{args.prefix}-{j}/reading".encode() for j in range(args.meters)]
    build = Packets(topics).build
    per_meter = [0] * args.meters
    sent = 0
    last_us = 0
    packet_id = 0
    start = time.monotonic()
    deadline = start + args.duration if args.duration else float("inf")
    first_wall = 0.0
    progress = open(args.progress, "w") if args.progress else None
    next_progress = 0.0
    while sent < args.count and time.monotonic() < deadline and not _stop:
        now = time.monotonic()
        allowed = args.count - sent
        if args.rate:
            allowed = min(allowed, int(args.rate * (now - start)) + 1 - sent)
        room = WINDOW - (sent - acks.count)
        k = min(allowed, room, CHUNK)
        if k <= 0:
            # wait for PUBACKs (window full) or for the next rate tick: 2 ms, so a paced publisher sends
            # ~20 messages a write at 10,000 msg/s (a tick of 1/rate made it one message, one select and one
            # send a message: 25 µs of CPU each, 5x the unpaced cost, taken from the machine under test)
            acks.read(wait=TICK_S)
            continue
        wall_us = time.time_ns() // 1000
        if not first_wall:
            first_wall = wall_us / 1e6
        packets = []
        for _ in range(k):
            last_us = max(wall_us, last_us + 1)
            j = sent % args.meters
            packet_id = packet_id % 65535 + 1
            packets.append(build(j, packet_id, sent, last_us))
            per_meter[j] += 1
            sent += 1
        data = b"".join(packets)
        view = memoryview(data)
        while view:
            try:
                n = sock.send(view)
                view = view[n:]
            except BlockingIOError:
                acks.read(wait=0.001)
        acks.read()
        if progress is not None and now >= next_progress:
            next_progress = now + 0.2
            progress.seek(0)
            progress.write(f"{acks.count:<12d}")
            progress.flush()
    last_wall = time.time()
    # every published message must be acknowledged before we report it as published
    ack_deadline = time.monotonic() + 60
    while acks.count < sent and time.monotonic() < ack_deadline:
        acks.read(wait=0.05)
    sock.setblocking(True)
    sock.sendall(b"\xe0\x00")  # DISCONNECT
    sock.close()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "prefix": args.prefix,
        "published": sent,
        "acked": acks.count,
        "first": first_wall,
        "last": last_wall,
        "per_meter": per_meter,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.publisher")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--prefix", required=True, help="meter ids are <prefix>-<n>")
    p.add_argument("--meters", type=int, default=1000)
    p.add_argument("--count", type=int, required=True, help="at most this many messages")
    p.add_argument("--rate", type=float, default=0.0, help="messages/s (0: as fast as the window allows)")
    p.add_argument("--duration", type=float, default=0.0, help="stop publishing after this many seconds")
    p.add_argument("--progress", help="file to keep the acknowledged count in while running")
    args = p.parse_args(argv)
    print(json.dumps(run(args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
