"""The ingress's hand-written MQTT codec: what it encodes is valid MQTT, and it parses any chunking."""

from __future__ import annotations

import pytest

from bridge import packets


def publish_v(version: int, topic: str, payload: bytes, qos: int, pid: int, props: bytes = b"") -> bytes:
    """A PUBLISH as a broker sends it (MQTT 5: with a properties block)."""
    body = len(topic).to_bytes(2, "big") + topic.encode()
    if qos:
        body += pid.to_bytes(2, "big")
    if version == 5:
        body += packets.varint(len(props)) + props
    body += payload
    return bytes([0x30 | qos << 1 | 1]) + packets.varint(len(body)) + body


@pytest.mark.parametrize("n", [0, 1, 127, 128, 16383, 16384, 2097151, 2097152, 268435455])
def test_varint_round_trip(n: int) -> None:
    """Remaining lengths encode in 1-4 bytes and read back."""
    raw = packets.varint(n)
    assert len(raw) == 1 + (n > 127) + (n > 16383) + (n > 2097151)
    assert packets.read_varint(raw, 0) == (n, len(raw))


@pytest.mark.parametrize("version", [4, 5])
def test_split_parses_every_chunking(version: int) -> None:
    """Fed one byte at a time or whole, the same PUBLISHes (with MQTT 5 properties) and PINGRESP come out."""
    big = b"x" * 300  # a two-byte remaining length
    stream = (
        publish_v(version, "meters/a/reading", b'{"v":1}', 1, 7, b"\x01\x01")
        + b"\xd0\x00"
        + publish_v(version, "pumps/p/status", big, 0, 0)
    )
    expected = [(b"meters/a/reading", b'{"v":1}', 1, True, 7), (b"pumps/p/status", big, 0, True, 0)]
    for step in (1, 2, 5, len(stream)):
        buf = bytearray()
        pubs: list[packets.Publish] = []
        others: list[packets.Packet] = []
        for i in range(0, len(stream), step):
            buf += stream[i : i + step]
            del buf[: packets.split(buf, version, pubs, others)]
        assert not buf
        assert pubs == expected
        assert [p.kind for p in others] == [packets.PINGRESP]


def test_refuses_qos_2_and_overlong_lengths() -> None:
    """A QoS 2 PUBLISH on our QoS 1 subscription, or a 5-byte length, is a protocol error."""
    with pytest.raises(packets.ProtocolError):
        packets.split(bytearray(publish_v(4, "t", b"", 2, 1)), 4, [], [])
    with pytest.raises(packets.ProtocolError):
        packets.split(bytearray(b"\x30\xff\xff\xff\xff\x01"), 4, [], [])


def test_encoders() -> None:
    """CONNECT, SUBSCRIBE, PUBLISH and PUBACK bytes as the MQTT specifications lay them out."""
    c = packets.connect("id", version=4, keepalive=30, clean=False, username="u", password="p")
    assert c == b"\x10\x14\x00\x04MQTT\x04\xc0\x00\x1e\x00\x02id\x00\x01u\x00\x01p"
    c5 = packets.connect("id", version=5, keepalive=30, clean=True, session_expiry=60, receive_maximum=1000)
    assert c5 == b"\x10\x17\x00\x04MQTT\x05\x02\x00\x1e\x08\x11\x00\x00\x00\x3c\x21\x03\xe8\x00\x02id"
    assert packets.subscribe(1, ["a/#"], version=5) == b"\x82\x09\x00\x01\x00\x00\x03a/#\x01"
    assert packets.publish("t", b"x", version=4, qos=1, packet_id=9) == b"\x32\x06\x00\x01t\x00\x09x"
    assert packets.pubacks([1, 258]) == b"\x40\x02\x00\x01\x40\x02\x01\x02"
    assert packets.suback(b"\x00\x05\x00\x01\x80", 5) == (5, [1, 0x80])
    assert packets.connack(b"\x01\x00", 4) == (True, 0)
    assert packets.first(b"\x20\x02\x00") is None
    assert packets.first(b"\x20\x02\x00\x00\x30") == (packets.Packet(packets.CONNACK, 0, b"\x00\x00"), 4)
