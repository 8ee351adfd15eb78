"""bridge/mqtt.py: how the ingress hands messages to the writer (no broker needed for this part)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import orjson
import pytest

from bridge.mqtt import MqttIngress
from bridge.telemetry import Decoded, Decoder

from .conftest import settings_for


@pytest.fixture
def ingress() -> Iterator[MqttIngress]:
    settings = replace(settings_for("postgresql://unused/db", "mqtt://127.0.0.1:1"), flush_interval=0.5)
    made = MqttIngress(settings, Decoder(ZoneInfo("Europe/Berlin")))
    yield made
    made._poke_r.close()
    made._poke_w.close()


def reading(received_at: datetime) -> Decoded:
    payload = orjson.dumps({"meterId": "m1", "kwhConsumedAc": 1.0, "timestamp": int(received_at.timestamp() * 1000)})
    decoded = Decoder(ZoneInfo("Europe/Berlin")).decode("meters/m1/reading", payload, received_at)
    assert decoded is not None
    return decoded


async def test_a_batch_that_waited_while_the_last_was_written_goes_at_once(ingress: MqttIngress) -> None:
    """The flush interval counts from the oldest message's arrival, not from when the writer asks again."""
    ingress._buffer.append(reading(datetime.now(UTC) - timedelta(seconds=1)))
    t0 = time.monotonic()
    batch = await ingress.next_batch(timeout=5)
    assert len(batch) == 1
    assert time.monotonic() - t0 < 0.25


async def test_a_fresh_message_waits_the_flush_interval_for_company(ingress: MqttIngress) -> None:
    """A message that just came in is held up to the flush interval, so light load still batches."""
    ingress._buffer.append(reading(datetime.now(UTC)))
    t0 = time.monotonic()
    batch = await ingress.next_batch(timeout=5)
    assert len(batch) == 1
    assert 0.4 <= time.monotonic() - t0 < 2.0


def test_messages_of_one_read_arrive_in_order_a_microsecond_apart(ingress: MqttIngress) -> None:
    """Two timestamp-less readings of one meter in one socket read keep distinct times (else one is a repeat)."""
    body = orjson.dumps({"kwhConsumedAc": 1.0})
    ingress._take([(b"meters/m1/reading", body, 1, False, 1), (b"meters/m1/reading", body, 1, False, 2)])
    first, second = ingress._buffer
    assert first.received_at < second.received_at
    assert [r.ts for r in first.records + second.records] == [first.received_at, second.received_at]
