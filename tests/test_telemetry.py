"""Decoding device payloads into records or dead letters (no services needed)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import orjson
import pytest

from bridge.telemetry import (
    DeadLetter,
    Decoder,
    Message,
    MeterReading,
    ObisReading,
    Presence,
    PumpEvent,
    PumpStatus,
    VehicleReading,
)

BERLIN = ZoneInfo("Europe/Berlin")
NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
PUMP_STATUS = {
    "device_id": "esp32_controller_001",
    "timestamp": 1763650800000,
    "ground_tank": {
        "level_percent": 45.2,
        "level_inches": 12.5,
        "alarm_active": False,
        "connected": True,
        "sensor_working": True,
        "water_supply_on": False,
    },
    "roof_tank": {
        "level_percent": 78.9,
        "level_inches": 25.3,
        "alarm_active": False,
        "connected": True,
        "sensor_working": True,
        "water_supply_on": True,
    },
    "pump": {
        "running": True,
        "manual_override": False,
        "current_amps": 5.2,
        "power_watts": 1196.0,
        "daily_consumption": 2.4,
        "hourly_consumption": 0.1,
        "runtime_minutes": 45,
        "total_runtime_hours": 12,
        "protection_active": False,
        "overcurrent_protection": False,
        "overtime_protection": False,
    },
    "system": {"auto_mode_enabled": True, "manual_pump_control": False, "water_supply_active": True},
}


def decode(topic: str, payload: object) -> Message | DeadLetter | None:
    raw = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    return Decoder(BERLIN).decode(topic, raw, NOW)


def records(topic: str, payload: object) -> list[object]:
    out = decode(topic, payload)
    assert isinstance(out, Message), out
    return list(out.records)


def reason(topic: str, payload: object) -> str:
    out = decode(topic, payload)
    assert isinstance(out, DeadLetter), out
    return out.reason


def test_meter_reading_with_ems_names() -> None:
    """EMS's deviceId/totalPowerKw/frequency land in a meter reading."""
    (r,) = records(
        "meters/m1/reading",
        {"deviceId": "m1", "totalPowerKw": 12.5, "frequency": 50.01, "timestamp": "2026-11-20T14:00:00Z"},
    )
    assert isinstance(r, MeterReading)
    assert (r.power_kw, r.frequency, r.ts) == (12.5, 50.01, datetime(2026, 11, 20, 14, tzinfo=UTC))


def test_meter_reading_with_eie_names() -> None:
    """EIE's meterId/kwhConsumedAc/voltage land in a meter reading."""
    (r,) = records(
        "meters/m1/reading", {"meterId": "m1", "kwhConsumedAc": 1.25, "voltage": 230.1, "timestamp": 1763650800000}
    )
    assert isinstance(r, MeterReading)
    assert (r.kwh_consumed_ac, r.voltage) == (1.25, 230.1)
    assert r.ts == datetime.fromtimestamp(1763650800, UTC)


def test_vehicle_reading() -> None:
    """An EIE vehicle reading keeps soc, DC kWh and battery temperature."""
    (r,) = records("vehicles/v1/reading", {"vehicleId": "v1", "soc": 55, "kwhDeliveredDc": 2.5, "batteryTemp": 31})
    assert isinstance(r, VehicleReading)
    assert (r.soc, r.kwh_delivered_dc, r.battery_temp, r.ts) == (55, 2.5, 31, NOW)


def test_obis_list_form_applies_scaler() -> None:
    """The `readings` form stores value x 10^scaler and keeps unit and quality."""
    rs = records(
        "meters/m1/obis",
        {
            "readings": [
                {"obisCode": "1-0:1.8.0.255", "value": 12345, "unit": "Wh", "scaler": -3, "quality": "good"},
                {"obisCode": "1-0:32.7.0.255", "value": 2301, "unit": "V", "scaler": -1},
            ]
        },
    )
    assert [(r.obis_code, r.value, r.unit) for r in rs if isinstance(r, ObisReading)] == [
        ("1-0:1.8.0.255", pytest.approx(12.345), "Wh"),
        ("1-0:32.7.0.255", pytest.approx(230.1), "V"),
    ]


def test_obis_flat_form() -> None:
    """HES's flat `{"code": value}` form becomes one reading per code."""
    rs = records("meters/m1/obis", {"1-0:1.8.0.255": 12345, "1-0:2.8.0": 7, "timestamp": "2026-11-20T10:00:00"})
    assert sorted((r.obis_code, r.value) for r in rs if isinstance(r, ObisReading)) == [
        ("1-0:1.8.0.255", 12345),
        ("1-0:2.8.0", 7),
    ]
    assert all(r.ts == datetime(2026, 11, 20, 10, tzinfo=BERLIN) for r in rs if isinstance(r, ObisReading))


def test_pump_status_nested_document() -> None:
    """The PUMP README's status example decodes with every nested field."""
    (r,) = records("pumps/esp32_controller_001/status", PUMP_STATUS)
    assert isinstance(r, PumpStatus)
    assert r.status.ground_tank.level_percent == 45.2
    assert r.status.pump.current_amps == 5.2
    assert r.status.system is not None and r.status.system.auto_mode_enabled is True


def test_pump_event_keeps_extra_fields() -> None:
    """A pump event keeps its whole payload."""
    (r,) = records("pumps/p1/event", {"event": "pump_started", "reason": "auto"})
    assert isinstance(r, PumpEvent) and r.event == "pump_started" and r.payload["reason"] == "auto"


@pytest.mark.parametrize(
    ("payload", "online"),
    [(b"online", True), (b"offline", False), (b'{"online": true}', True), (b'{"online": false}', False)],
)
def test_presence_forms(payload: bytes, online: bool) -> None:
    """`online`/`offline` text and `{"online": bool}` both set presence."""
    (r,) = records("meters/m1/online", payload)
    assert isinstance(r, Presence) and r.online is online


def test_naive_iso_is_read_in_site_zone_and_epoch_ms_is_utc() -> None:
    """A naive ISO time is local to SITE_TIMEZONE; epoch ms is absolute."""
    (a,) = records("meters/m1/reading", {"totalPowerKw": 1, "timestamp": "2026-07-01T14:00:00"})
    assert isinstance(a, MeterReading) and a.ts == datetime(2026, 7, 1, 12, tzinfo=UTC)


def test_uptime_millis_means_receive_time() -> None:
    """An ESP32's millis() (uptime, not an epoch) is replaced by the receive time."""
    (r,) = records("meters/m1/reading", {"totalPowerKw": 1, "timestamp": 45000})
    assert isinstance(r, MeterReading) and r.ts == NOW


@pytest.mark.parametrize(
    ("topic", "payload", "expected"),
    [
        ("meters/m1/reading", b"not json", "not valid JSON"),
        ("meters/m1/reading", b'{"totalPowerKw": NaN}', "not valid JSON"),
        ("meters/m1/reading", {"totalPowerKw": "50"}, "totalPowerKw"),
        ("meters/m1/reading", {"totalPowerKw": True}, "totalPowerKw"),
        ("meters/m1/reading", {"powerFactor": 1.5}, "powerFactor"),
        ("meters/m1/reading", {"voltage": 230, "meterId": "m2"}, "differs"),
        ("meters/m1/reading", {"timestamp": 1763650800000}, "at least one measurement"),
        ("meters/m1/reading", [1, 2], "JSON object"),
        ("vehicles/v1/reading", {"soc": 120}, "soc"),
        ("pumps/p1/status", {"ground_tank": {}, "roof_tank": {}}, "pump"),
        ("pumps/p1/status", {**PUMP_STATUS, "device_id": "p2"}, "differs"),
        ("meters/m1/obis", {"readings": [{"obisCode": "nope", "value": 1}]}, "obisCode"),
        ("meters/m1/obis", {"foo": 1}, "readings"),
        ("meters/m1/temperature", {"x": 1}, "unknown topic"),
        ("meters/bad id/reading", {"voltage": 1}, "invalid device id"),
        ("meters/m1/reading", {"voltage": 1, "timestamp": "yesterday"}, "ISO-8601"),
    ],
)
def test_bad_input_is_explained(topic: str, payload: object, expected: str) -> None:
    """Each kind of bad input becomes a dead letter whose reason names the problem."""
    assert expected in reason(topic, payload)


def test_future_timestamp_is_refused() -> None:
    """A device clock far in the future is refused rather than stored in a future block."""
    future = (NOW + timedelta(days=2)).isoformat()
    assert "future" in reason("meters/m1/reading", {"voltage": 230, "timestamp": future})


def test_oversized_payload_is_refused() -> None:
    """A payload over 64 KiB is dead-lettered with its size."""
    big = orjson.dumps({"voltage": 230, "pad": "x" * 70000})
    assert "exceeds" in reason("meters/m1/reading", big)


def test_deep_nesting_is_refused_not_crashing() -> None:
    """Pathologically nested JSON is a clean dead letter, not a RecursionError."""
    assert "JSON" in reason("meters/m1/reading", b"[" * 5000 + b"]" * 5000)


def test_outbound_command_topic_is_ignored() -> None:
    """Our own `…/cmd` messages, seen through the prefix subscription, are neither stored nor dead-lettered."""
    assert decode("pumps/p1/cmd", {"commandId": "c1", "command": "pump"}) is None


def test_plain_meter_path_accepts_only_what_the_model_accepts_with_the_same_values() -> None:
    """Random meter payloads: whatever the pydantic-free path accepts, MeterReadingIn accepts with equal fields."""
    import random

    from bridge.telemetry import MeterReadingIn, plain_meter_reading

    rng = random.Random(3)
    names = ["totalPowerKw", "kwhConsumedAc", "energyTotalKwh", "voltage", "current", "frequency", "powerFactor"]
    odd_values = [None, 0, 5, -1.5, 1e13, -2e6, float("nan"), float("inf"), True, "12", [1.0], 0.5, 230.4, 999.9]
    taken = 0
    for _ in range(20000):
        data: dict[str, object] = {}
        for name in rng.sample(names, rng.randrange(0, 4)):
            data[name] = rng.choice(odd_values) if rng.random() < 0.3 else rng.uniform(-2, 2) * 10 ** rng.randrange(4)
        if rng.random() < 0.3:
            data["meterId"] = rng.choice(["m-1", 7, None])
        if rng.random() < 0.5:
            data["timestamp"] = rng.choice(["2026-12-06T05:00:00Z", 1_764_997_200_000, 1.5e12, None, False, {}])
        if rng.random() < 0.1:
            data[rng.choice(["deviceId", "powerKw", "extra"])] = 1.0
        plain = plain_meter_reading(data)
        if plain is None:
            continue
        taken += 1
        model = MeterReadingIn.model_validate(data)
        assert (model.meterId, model.timestamp) == plain[:2], data
        assert [getattr(model, n) for n in names] == plain[2], data
    assert taken > 2000


def test_usual_meter_payload_takes_the_plain_path() -> None:
    """The contract's meter payload (floats, ISO timestamp) is decoded without the model."""
    from bridge.telemetry import plain_meter_reading

    data = orjson.loads(b'{"totalPowerKw":12.5,"voltage":230.4,"current":54.3,"timestamp":"2026-12-06T05:00:00Z"}')
    assert plain_meter_reading(data) == (None, "2026-12-06T05:00:00Z", [12.5, None, None, 230.4, 54.3, None, None])
