"""The benchmark's publisher: its pre-encoded packets are the plain MQTT encoding, byte for byte."""

from __future__ import annotations

import random

from bench.publisher import POWERS, Packets, payload, publish_packet


def test_packets_equal_the_plain_encoding() -> None:
    """Every piece the fast builder caches (topic, power head, date to the second, length) gives the plain bytes."""
    rng = random.Random(3)
    topics = [f"meters/bm-{j}/reading".encode() for j in (0, 7, 12345)] + [b"meters/" + b"x" * 200 + b"/reading"]
    build = Packets(topics).build
    ts = 1_796_000_000_999_990  # crosses a second within the first few messages
    for seq in range(3000):
        ts += rng.choice((1, 3, 250_000))
        meter, packet_id = rng.randrange(len(topics)), rng.randrange(1, 65536)
        plain = publish_packet(topics[meter], packet_id, payload(10.0 + (seq % POWERS) / 10, ts))
        assert build(meter, packet_id, seq, ts) == plain, (seq, ts)
