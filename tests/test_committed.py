"""The committed note (`bridge.committed`): what consumers read back from it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from bridge import committed
from bridge.telemetry import Decoder, Message

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


def _messages() -> list[Message]:
    decoder = Decoder("UTC")
    sent: list[tuple[str, Any]] = [
        ("meters/m1/reading", {"totalPowerKw": 1.5, "voltage": 230.0, "timestamp": "2026-12-06T11:59:00Z"}),
        ("pumps/p1/event", {"event": "pump_started", "reason": "auto", "timestamp": "2026-12-06T11:59:01Z"}),
        ("meters/m2/reading", {"kwhConsumedAc": 0.25, "energyTotalKwh": 10.0, "timestamp": 1796558340000}),
        ("meters/m1/obis", {"readings": [{"obisCode": "1-0:1.8.0.255", "value": 12345, "unit": "Wh", "scaler": -3}]}),
        ("meters/m2/online", b"online"),
        ("meters/m1/reading", {"totalPowerKw": -2.0, "powerFactor": 0.9, "timestamp": "2026-12-06T11:59:30Z"}),
    ]
    out = []
    for i, (topic, body) in enumerate(sent):
        payload = body if isinstance(body, bytes) else orjson.dumps(body)
        item = decoder.decode(topic, payload, NOW + timedelta(milliseconds=i))
        assert isinstance(item, Message), (topic, item)
        out.append(item)
    return out


def test_note_records_are_the_one_record_form_of_every_stored_record() -> None:
    """Reading a note back gives each record as `record_json` names it: meter readings' columns included."""
    items = _messages()
    expected = [
        orjson.loads(orjson.dumps({"kind": m.kind, "deviceId": m.device_id, **committed.record_json(r)}))
        for m in items
        for r in m.records
    ]
    note = orjson.loads(committed.payload(items, [("m2", "meter", "online")]) or b"")
    got = list(committed.records(note))

    def key(rec: dict[str, Any]) -> bytes:
        return orjson.dumps(rec, option=orjson.OPT_SORT_KEYS)

    assert sorted(map(key, got)) == sorted(map(key, expected))
    assert len(note["meterReadings"]["deviceId"]) == 3  # the readings went as columns, the rest as records
    assert note["statusChanges"] == [{"deviceId": "m2", "kind": "meter", "status": "online"}]


def test_malformed_meter_columns_are_skipped() -> None:
    """Columns of unequal length yield nothing from the block, and the other records still come through."""
    note = {
        "records": [{"kind": "pump", "deviceId": "p1", "type": "status", "ts": "t", "data": {}}],
        "meterReadings": {"deviceId": ["m1", "m2"], "ts": ["a"], **{f: [1.0, 2.0] for f in committed.METER_FIELDS}},
    }
    assert [r["deviceId"] for r in committed.records(note)] == ["p1"]
