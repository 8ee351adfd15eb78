"""The few MQTT 3.1.1 / 5 packets the bridge's ingress speaks, encoded and decoded by hand.

Why not paho here: paho reads every packet with three or more `recv` calls, builds a message object
and an MQTT 5 `Properties` object per PUBLISH, and queues every PUBACK through a lock and a wake-up
socket; on this 2-core machine that was half of the bridge's CPU. This codec parses whole socket reads
(hundreds of PUBLISH packets per `recv`) and sends a batch's PUBACKs in one write. It covers only what
the ingress needs: CONNECT/CONNACK, SUBSCRIBE/SUBACK, PUBLISH at QoS 0/1 both ways, PUBACK, PINGREQ/
PINGRESP and DISCONNECT. Everything else of ours (the API, firmware-sim, tests) keeps using paho or
aiomqtt.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 10, 11, 12, 13, 14

PING = b"\xc0\x00"
GOODBYE = b"\xe0\x00"  # DISCONNECT, normal: the session (and its unacknowledged messages) stays
_PUBACK = struct.Struct(">BBH")


class ProtocolError(Exception):
    """The broker sent something this client cannot follow; the connection is dropped and retried."""


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (128 if n else 0))
        if not n:
            return bytes(out)


def _str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    if len(b) > 65535:
        raise ValueError("MQTT strings are at most 65535 bytes")
    return len(b).to_bytes(2, "big") + b


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + varint(len(body)) + body


def connect(
    client_id: str,
    *,
    version: int,
    keepalive: int,
    clean: bool,
    username: str | None = None,
    password: str | None = None,
    session_expiry: int = 0,
    receive_maximum: int = 65535,
) -> bytes:
    """CONNECT; `version` 4 is MQTT 3.1.1, 5 is MQTT 5 (with Session Expiry and Receive Maximum)."""
    flags = (0x02 if clean else 0) | (0x80 if username is not None else 0) | (0x40 if password is not None else 0)
    body = _str("MQTT") + bytes([version, flags]) + keepalive.to_bytes(2, "big")
    if version == 5:
        props = b"\x11" + session_expiry.to_bytes(4, "big") + b"\x21" + receive_maximum.to_bytes(2, "big")
        body += varint(len(props)) + props
    body += _str(client_id)
    if username is not None:
        body += _str(username)
    if password is not None:
        body += _str(password)
    return _packet(CONNECT << 4, body)


def subscribe(packet_id: int, filters: Sequence[str], *, version: int, qos: int = 1) -> bytes:
    body = packet_id.to_bytes(2, "big") + (b"\x00" if version == 5 else b"")
    for f in filters:
        body += _str(f) + bytes([qos])
    return _packet(SUBSCRIBE << 4 | 0x02, body)


def publish(
    topic: str, payload: bytes, *, version: int, qos: int = 0, packet_id: int = 0, retain: bool = False
) -> bytes:
    """A PUBLISH at QoS 0 or 1 (QoS 1 needs a `packet_id`)."""
    body = _str(topic) + (packet_id.to_bytes(2, "big") if qos else b"") + (b"\x00" if version == 5 else b"") + payload
    return _packet(PUBLISH << 4 | qos << 1 | (1 if retain else 0), body)


def pubacks(packet_ids: Sequence[int]) -> bytes:
    """PUBACKs for many messages in one buffer (MQTT 5 allows leaving out reason 0 and the properties)."""
    pack = _PUBACK.pack
    return b"".join([pack(0x40, 2, pid) for pid in packet_ids])


@dataclass(slots=True)
class Packet:
    """A packet other than PUBLISH: its type, flags and body."""

    kind: int
    flags: int
    body: bytes


def connack(body: bytes, version: int) -> tuple[bool, int]:
    """(session present, reason code) of a CONNACK body."""
    if len(body) < 2:
        raise ProtocolError(f"CONNACK too short ({len(body)} bytes)")
    return bool(body[0] & 1), body[1]


def suback(body: bytes, version: int) -> tuple[int, list[int]]:
    """(packet id, reason codes) of a SUBACK body; codes >= 0x80 are refusals."""
    if len(body) < 3:
        raise ProtocolError(f"SUBACK too short ({len(body)} bytes)")
    pos = 2
    if version == 5:
        length, pos = read_varint(body, pos)
        pos += length
    return int.from_bytes(body[:2], "big"), list(body[pos:])


def read_varint(buf: bytes | bytearray, pos: int) -> tuple[int, int]:
    """A variable byte integer at `pos`: (value, position after it); ProtocolError if incomplete."""
    value, shift = 0, 0
    while True:
        if pos >= len(buf):
            raise ProtocolError("truncated variable byte integer")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7
        if shift > 21:
            raise ProtocolError("variable byte integer longer than 4 bytes")


# A received PUBLISH: (topic, payload, qos, retain, packet id; 0 at QoS 0)
Publish = tuple[bytes, bytes, int, bool, int]


def split(buf: bytearray, version: int, publishes: list[Publish], others: list[Packet]) -> int:
    """Parse every complete packet at the start of `buf`; returns how many bytes were consumed.

    PUBLISH packets (the hot path) go to `publishes` as plain tuples, the rest to `others`.
    """
    n = len(buf)
    pos = 0
    v5 = version == 5
    while pos + 2 <= n:
        first = buf[pos]
        # remaining length: a variable byte integer of 1-4 bytes
        i = pos + 1
        length = 0
        shift = 0
        while True:
            if i >= n:
                return pos
            b = buf[i]
            i += 1
            length |= (b & 0x7F) << shift
            if b < 0x80:
                break
            shift += 7
            if shift > 21:
                raise ProtocolError("remaining length longer than 4 bytes")
        end = i + length
        if end > n:
            return pos
        kind = first >> 4
        if kind == PUBLISH:
            qos = (first >> 1) & 3
            if qos > 1:
                # we subscribe at QoS 1, so a broker never sends QoS 2 (MQTT 3.1.1 §3.8.4, 5 §3.8.4)
                raise ProtocolError(f"PUBLISH with QoS {qos} on a QoS 1 subscription")
            tlen = (buf[i] << 8) | buf[i + 1]
            j = i + 2 + tlen
            topic = bytes(buf[i + 2 : j])
            pid = 0
            if qos:
                pid = (buf[j] << 8) | buf[j + 1]
                j += 2
            if v5:
                plen, j = read_varint(buf, j)
                j += plen
            if j > end:
                raise ProtocolError("PUBLISH header longer than the packet")
            publishes.append((topic, bytes(buf[j:end]), qos, bool(first & 1), pid))
        else:
            others.append(Packet(kind, first & 0x0F, bytes(buf[i:end])))
        pos = end
    return pos


def first(buf: bytes | bytearray) -> tuple[Packet, int] | None:
    """The first packet of `buf` and where it ends; None while it is incomplete."""
    if len(buf) < 2:
        return None
    try:
        length, start = read_varint(buf, 1)
    except ProtocolError:
        if len(buf) < 5:
            return None
        raise
    end = start + length
    if end > len(buf):
        return None
    return Packet(buf[0] >> 4, buf[0] & 0x0F, bytes(buf[start:end])), end
