"""Hostile input: every payload parser and every API body, fuzzed with hypothesis.

The decoder must turn anything (bytes, JSON of any shape, documents one field away from valid) into a
Message or a DeadLetter with a reason, never raise; valid documents must decode to their values. The
API must answer every body with a 2xx or an explained 4xx, never a 500. Strings that look like SQL are
data and are stored verbatim.
"""

from __future__ import annotations

import asyncio
import json
import string
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote
from zoneinfo import ZoneInfo

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import AliasChoices

from bridge import topics
from bridge.telemetry import (
    OBIS_CODE,
    CommandResult,
    CommandResultIn,
    DeadLetter,
    Decoder,
    Message,
    MeterReading,
    MeterReadingIn,
    ObisReading,
    ObisReadingsIn,
    Presence,
    PumpEvent,
    PumpEventIn,
    PumpStatus,
    PumpStatusIn,
    VehicleReading,
    VehicleReadingIn,
)

from .conftest import ApiServer, Publisher, query, unique, wait_for_rows
from .test_api_commands import FakeDevice, fake_device
from .test_api_pump import status_doc

__all__ = ["fake_device"]  # the fixture, shared with the command tests

SITE = ZoneInfo("Europe/Berlin")
DECODER = Decoder(SITE, max_future=600.0)
PURE = settings(max_examples=200, deadline=None, database=None)
HTTP = settings(
    max_examples=50,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# ---- strategies: ids, topics, JSON -------------------------------------------------------------------

ID_CHARS = string.ascii_letters + string.digits + "_.:-"
device_ids = st.text(ID_CHARS, min_size=1, max_size=64)
CHANNELS = sorted((topics.KIND_TO_PREFIX[k], ch) for k, chans in topics.CHANNELS.items() for ch in chans)
SQLISH = st.sampled_from(
    [
        "'); DROP TABLE devices;--",
        "1; DELETE FROM meter_readings WHERE 1=1",
        '" OR "1"="1',
        "' OR '1'='1",
        "%s%s%s",
        "%(id)s",
        "$1",
        "\\x00\\'",
        "💥 ünïcødé 𝄞",
        "\u202etxt.exe",
        "\x00",
        "\ud7ff\ue000\uffff",
    ]
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**200), max_value=2**200),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
    SQLISH,
)
FIELD_NAMES = st.sampled_from(
    [
        "meterId",
        "deviceId",
        "device_id",
        "vehicleId",
        "timestamp",
        "totalPowerKw",
        "kwhConsumedAc",
        "energyTotalKwh",
        "voltage",
        "soc",
        "readings",
        "obisCode",
        "1-0:1.8.0.255",
        "event",
        "online",
        "commandId",
        "status",
        "ground_tank",
        "pump",
        "running",
        "type",
        "command",
        "state",
        "obisCodes",
        "value",
    ]
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(FIELD_NAMES | st.text(max_size=12), inner, max_size=6),
    max_leaves=25,
)
json_objects = st.dictionaries(FIELD_NAMES | st.text(max_size=12), json_values, max_size=8)
# What a number may look like on the wire when the sender is not a JSON library.
BAD_NUMBERS = [b"NaN", b"Infinity", b"-Infinity", b"nan", b"inf", b"1e999", b"-1e999", b"0x10", b"1_000", b"+1"]


def dumps(value: Any) -> bytes:
    """stdlib json: unlike orjson it writes integers of any size, which is what a hostile sender may do."""
    return json.dumps(value).encode()


def nested(depth: int, doc: bytes = b"0") -> bytes:
    return b'{"event":"deep","n":' + b"[" * depth + doc + b"]" * depth + b"}"


raw_payloads = st.one_of(
    st.binary(max_size=300),
    json_values.map(dumps),
    st.sampled_from(BAD_NUMBERS).map(lambda t: b'{"totalPowerKw": ' + t + b', "soc": ' + t + b"}"),
    st.integers(min_value=1, max_value=3000).map(nested),
    st.text(max_size=50).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.sampled_from([b"", b"\xef\xbb\xbf{}", b"\xff\xfe{\x00}\x00", b"null", b"[]", b'"online"', b"{", b"\x00"]),
)


@st.composite
def device_topics(draw: st.DrawFn) -> str:
    prefix, channel = draw(st.sampled_from(CHANNELS))
    return f"{prefix}/{draw(device_ids)}/{channel}"


unknown_topics = st.one_of(
    st.text(max_size=40),
    st.builds(lambda p, i: f"{p}/{i}/reading", st.sampled_from(["meters", "vehicles", "pumps"]), st.text(max_size=70)),
    st.builds(
        lambda p, i, c: f"{p}/{i}/{c}",
        st.sampled_from(["meters", "vehicles", "pumps", "alerts", "telemetry", "$SYS"]),
        device_ids,
        st.text(max_size=20),
    ),
    st.sampled_from(["meters/mètre/reading", "pumps/пумп/status", "meters//reading", "meters/a/b/c/reading"]),
)


# ---- valid documents, with what they must decode to ----------------------------------------------------


def finite(lo: float, hi: float) -> st.SearchStrategy[float]:
    return st.floats(min_value=lo, max_value=hi, allow_nan=False, allow_infinity=False)


RECENT_MS = (
    int((datetime.now(UTC) - timedelta(days=60)).timestamp() * 1000),
    int(datetime.now(UTC).timestamp() * 1000),
)


@st.composite
def timestamps(draw: st.DrawFn) -> tuple[Any, datetime | None]:
    """A timestamp in one of the accepted forms and the instant it means (None: when received)."""
    form = draw(st.sampled_from(["absent", "ms", "ms-string", "iso", "naive", "uptime"]))
    ms = draw(st.integers(*RECENT_MS))
    at = EPOCH + timedelta(milliseconds=ms)
    if form == "absent":
        return None, None
    if form == "ms":
        return ms, at
    if form == "ms-string":
        return str(ms), at
    if form == "uptime":  # an ESP32's millis(): not a time, so the bridge uses its own clock
        return draw(st.integers(0, 10**10)), None
    zone = draw(st.sampled_from([UTC, SITE, ZoneInfo("America/New_York"), ZoneInfo("Asia/Kolkata")]))
    local = at.astimezone(zone)
    if form == "iso":
        return local.isoformat(), local
    naive = at.astimezone(SITE).replace(tzinfo=None)
    return naive.isoformat(), naive.replace(tzinfo=SITE)


METER_FIELDS = {
    "totalPowerKw": (("totalPowerKw", "powerKw", "total_power_kw", "power_kw"), -1e6, 1e6, "power_kw"),
    "kwhConsumedAc": (("kwhConsumedAc", "kwh_consumed_ac", "kwhConsumed"), 0, 1e6, "kwh_consumed_ac"),
    "energyTotalKwh": (("energyTotalKwh", "energy_total_kwh", "totalEnergyKwh"), 0, 1e12, "energy_total_kwh"),
    "voltage": (("voltage",), 0, 1e6, "voltage"),
    "current": (("current",), -1e5, 1e5, "current"),
    "frequency": (("frequency",), 0, 1000, "frequency"),
    "powerFactor": (("powerFactor", "power_factor"), -1, 1, "power_factor"),
}
VEHICLE_FIELDS = {
    "soc": (("soc",), 0, 100, "soc"),
    "kwhDeliveredDc": (("kwhDeliveredDc", "kwh_delivered_dc"), 0, 1e6, "kwh_delivered_dc"),
    "batteryTemp": (("batteryTemp", "battery_temp"), -60, 150, "battery_temp"),
}


@st.composite
def measurements(draw: st.DrawFn, fields: dict[str, Any]) -> tuple[dict[str, Any], dict[str, float | None]]:
    """At least one measurement, each under one of its accepted names: (body part, expected attributes)."""
    chosen = draw(st.sets(st.sampled_from(sorted(fields)), min_size=1))
    body: dict[str, Any] = {}
    expected: dict[str, float | None] = {attr: None for *_, attr in fields.values()}
    for name in chosen:
        aliases, lo, hi, attr = fields[name]
        value = draw(finite(lo, hi) | st.integers(int(lo), int(hi)))
        body[draw(st.sampled_from(aliases))] = value
        expected[attr] = value
    return body, expected


@st.composite
def with_id(draw: st.DrawFn, body: dict[str, Any], device: str, names: tuple[str, ...], always: bool) -> dict[str, Any]:
    """The device id in the body under one of its names: optional on MQTT, required over HTTP."""
    if always or draw(st.booleans()):
        body[draw(st.sampled_from(names))] = device
    return body


Valid = tuple[str, dict[str, Any], Callable[[Message], None]]


@st.composite
def meter_readings(draw: st.DrawFn, device: str | None = None, http: bool = False) -> Valid:
    device = device or draw(device_ids)
    body, expected = draw(measurements(METER_FIELDS))
    stamp, at = draw(timestamps())
    if stamp is not None:
        body["timestamp"] = stamp
    body = draw(with_id(body, device, ("meterId", "deviceId", "meter_id", "device_id"), http))

    def check(msg: Message) -> None:
        (rec,) = msg.records
        assert isinstance(rec, MeterReading) and rec.meter_id == device
        assert {a: getattr(rec, a) for a in expected} == expected
        assert rec.ts == (at or msg.received_at)

    return f"meters/{device}/reading", body, check


@st.composite
def vehicle_readings(draw: st.DrawFn, device: str | None = None, http: bool = False) -> Valid:
    device = device or draw(device_ids)
    body, expected = draw(measurements(VEHICLE_FIELDS))
    stamp, at = draw(timestamps())
    if stamp is not None:
        body["timestamp"] = stamp
    body = draw(with_id(body, device, ("vehicleId", "deviceId", "vehicle_id", "device_id"), http))

    def check(msg: Message) -> None:
        (rec,) = msg.records
        assert isinstance(rec, VehicleReading) and rec.vehicle_id == device
        assert {a: getattr(rec, a) for a in expected} == expected
        assert rec.ts == (at or msg.received_at)

    return f"vehicles/{device}/reading", body, check


obis_codes = st.builds(
    lambda parts, last: "{}-{}:{}.{}.{}".format(*parts) + (f".{last}" if last is not None else ""),
    st.tuples(*[st.integers(0, 255)] * 5),
    st.none() | st.integers(0, 255),
)


@st.composite
def obis_documents(draw: st.DrawFn, device: str | None = None, http: bool = False) -> Valid:
    """Both forms: the `readings` list (value * 10^scaler is stored) and HES's flat `{code: value}`."""
    device = device or draw(device_ids)
    codes = draw(st.lists(obis_codes, min_size=1, max_size=8, unique=True))
    values = [draw(finite(-1e12, 1e12)) for _ in codes]
    expected: dict[str, tuple[float, float, int, str | None, str | None]] = {}
    if draw(st.booleans()):
        readings = []
        for code, raw in zip(codes, values, strict=True):
            scaler = draw(st.integers(-12, 12))
            unit = draw(st.none() | st.text(max_size=32) | SQLISH.filter(lambda u: len(u) <= 32))
            quality = draw(st.none() | st.text(max_size=32))
            item = {draw(st.sampled_from(["obisCode", "obis_code", "code"])): code, "value": raw, "scaler": scaler}
            if unit is not None:
                item["unit"] = unit
            if quality is not None:
                item["quality"] = quality
            readings.append(item)
            expected[code] = (raw * 10.0**scaler, raw, scaler, unit, quality)
        body: dict[str, Any] = {"readings": readings}
    else:
        body = dict(zip(codes, values, strict=True))
        expected = {code: (raw, raw, 0, None, None) for code, raw in zip(codes, values, strict=True)}
    stamp, at = draw(timestamps())
    if stamp is not None:
        body["timestamp"] = stamp
    body = draw(with_id(body, device, ("meterId", "deviceId"), http))

    def check(msg: Message) -> None:
        assert all(isinstance(r, ObisReading) and r.ts == (at or msg.received_at) for r in msg.records)
        got = {r.obis_code: (r.value, r.raw_value, r.scaler, r.unit, r.quality) for r in msg.records}  # type: ignore[union-attr]
        assert got == expected

    return f"meters/{device}/obis", body, check


tanks = st.fixed_dictionaries(
    {},
    optional={
        "level_percent": finite(0, 100),
        "level_inches": finite(0, 10000),
        "alarm_active": st.booleans(),
        "connected": st.booleans(),
        "sensor_working": st.booleans(),
        "water_supply_on": st.booleans(),
    },
)
pumps = st.fixed_dictionaries(
    {"running": st.booleans()},
    optional={
        "manual_override": st.booleans(),
        "current_amps": finite(0, 1000),
        "power_watts": finite(0, 1e6),
        "daily_consumption": finite(0, 1e9),
        "runtime_minutes": finite(0, 1e9),
        "protection_active": st.booleans(),
    },
)


@st.composite
def pump_statuses(draw: st.DrawFn, device: str | None = None, http: bool = False) -> Valid:
    device = device or draw(device_ids)
    body: dict[str, Any] = {"ground_tank": draw(tanks), "roof_tank": draw(tanks), "pump": draw(pumps)}
    if draw(st.booleans()):
        body["system"] = {"auto_mode_enabled": draw(st.booleans()), "water_supply_active": draw(st.booleans())}
    stamp, at = draw(timestamps())
    if stamp is not None:
        body["timestamp"] = stamp
    body = draw(with_id(body, device, ("device_id", "deviceId"), http))

    def check(msg: Message) -> None:
        (rec,) = msg.records
        assert isinstance(rec, PumpStatus) and rec.device_id == device
        assert rec.ts == (at or msg.received_at)
        assert rec.status.pump.model_dump(exclude_unset=True) == body["pump"]
        assert rec.status.ground_tank.model_dump(exclude_unset=True) == body["ground_tank"]
        assert rec.status.roof_tank.model_dump(exclude_unset=True) == body["roof_tank"]

    return f"pumps/{device}/status", body, check


@st.composite
def pump_events(draw: st.DrawFn, device: str | None = None, http: bool = False) -> Valid:
    device = device or draw(device_ids)
    name = draw(st.text(min_size=1, max_size=64) | SQLISH)
    body = draw(
        st.dictionaries(
            st.text(max_size=10).filter(
                lambda k: k not in ("event", "event_type", "type", "timestamp", "device_id", "deviceId")
            ),
            json_values,
            max_size=4,
        )
    )
    body["event"] = name
    stamp, at = draw(timestamps())
    if stamp is not None:
        body["timestamp"] = stamp
    body = draw(with_id(body, device, ("device_id", "deviceId"), http))

    def check(msg: Message) -> None:
        (rec,) = msg.records
        assert isinstance(rec, PumpEvent) and rec.device_id == device
        assert rec.event == name and rec.ts == (at or msg.received_at)
        assert rec.payload == orjson.loads(dumps(body))

    return f"pumps/{device}/event", body, check


@st.composite
def command_results(draw: st.DrawFn) -> Valid:
    prefix = draw(st.sampled_from(["meters", "vehicles", "pumps"]))
    device = draw(device_ids)
    body: dict[str, Any] = {
        "commandId": draw(st.text(min_size=1, max_size=128)),
        "status": draw(st.sampled_from(["ok", "error"])),
    }
    if draw(st.booleans()):
        body["message"] = draw(st.text(max_size=40) | SQLISH)
    if draw(st.booleans()):
        body["data"] = draw(json_values)

    def check(msg: Message) -> None:
        (rec,) = msg.records
        assert isinstance(rec, CommandResult) and rec.device_id == device
        assert rec.command_id == body["commandId"] and rec.ok == (body["status"] == "ok")

    return f"{prefix}/{device}/cmd/result", body, check


valid_documents = st.one_of(
    meter_readings(), vehicle_readings(), obis_documents(), pump_statuses(), pump_events(), command_results()
)


# ---- the properties of the decoder ---------------------------------------------------------------------


def decode(topic: str, payload: bytes) -> Message | DeadLetter | None:
    """Decode and check what holds for any input: no exception, a Message or an explained DeadLetter."""
    out = DECODER.decode(topic, payload, datetime.now(UTC))
    if out is None:
        assert topic.endswith("/cmd"), f"only our own commands are skipped, not {topic!r}"
        return None
    assert isinstance(out, Message | DeadLetter), out
    if isinstance(out, DeadLetter):
        assert isinstance(out.reason, str) and out.reason.strip(), out
        assert (out.topic, out.payload) == (topic, payload), "a dead letter keeps the message whole"
    else:
        assert out.records, "a stored message yields at least one record"
    return out


@PURE
@given(topic=device_topics() | unknown_topics, payload=raw_payloads)
def test_decoder_takes_any_bytes(topic: str, payload: bytes) -> None:
    """Arbitrary bytes on any topic (known, unknown, bad ids) decode to a Message or an explained DeadLetter."""
    decode(topic, payload)


@PURE
@given(topic=device_topics(), doc=json_objects)
def test_decoder_takes_any_json_object(topic: str, doc: dict[str, Any]) -> None:
    """Arbitrary JSON objects (deep, huge numbers, wrong types, SQL-looking strings) never crash the decoder."""
    decode(topic, dumps(doc))


@PURE
@given(doc=valid_documents)
def test_valid_documents_decode_to_their_values(doc: Valid) -> None:
    """Valid readings, OBIS in both forms, pump status and events, command results decode to the values sent."""
    topic, body, check = doc
    out = decode(topic, dumps(body))
    assert isinstance(out, Message), out
    check(out)


# every name a model reads, so that a field added under any other name is known to be ignored
MODEL_NAMES = frozenset(
    name
    for model in (MeterReadingIn, VehicleReadingIn, ObisReadingsIn, PumpStatusIn, PumpEventIn, CommandResultIn)
    for field_name, info in model.model_fields.items()
    for name in (
        [c for c in info.validation_alias.choices if isinstance(c, str)]
        if isinstance(info.validation_alias, AliasChoices)
        else [field_name]
    )
)


@st.composite
def mutated(draw: st.DrawFn) -> tuple[str, dict[str, Any], bool]:
    """A valid document with one field replaced by any JSON value, deleted, or one field added; and whether
    it must still decode (a field no model reads was added)."""
    topic, body, _ = draw(valid_documents)
    how = draw(st.sampled_from(["replace", "delete", "add"]))
    key = draw(st.sampled_from(sorted(body))) if body else "x"
    value = draw(json_values)
    body = dict(body)
    if how == "delete":
        body.pop(key, None)
    elif how == "replace":
        body[key] = value
    else:
        key = draw(FIELD_NAMES | st.text(max_size=12))
        body[key] = value
    ignored = how == "add" and key not in MODEL_NAMES and not OBIS_CODE.match(key)
    return topic, body, ignored


@PURE
@given(doc=mutated())
def test_near_valid_documents_decode_or_are_explained(doc: tuple[str, dict[str, Any], bool]) -> None:
    """A document one field away from valid decodes or is dead-lettered with a reason; an unknown field
    added to it is ignored."""
    topic, body, ignored = doc
    out = decode(topic, dumps(body))
    if ignored:
        assert isinstance(out, Message), out


@PURE
@given(doc=st.one_of(meter_readings(), vehicle_readings()), data=st.data())
def test_a_wrong_type_is_named_in_the_reason(doc: Valid, data: st.DataObject) -> None:
    """A measurement sent with the wrong type is dead-lettered, and the reason names the field as sent."""
    topic, body, _ = doc
    numeric = sorted(k for k, v in body.items() if k != "timestamp" and isinstance(v, int | float))
    key = data.draw(st.sampled_from(numeric))
    body[key] = data.draw(st.text(max_size=10) | st.booleans() | st.lists(st.integers(), max_size=2) | st.just({}))
    out = decode(topic, dumps(body))
    assert isinstance(out, DeadLetter) and key in out.reason, out


@PURE
@given(doc=valid_documents, token=st.sampled_from(BAD_NUMBERS[:7]))
def test_nan_and_infinity_tokens_are_dead_lettered(doc: Valid, token: bytes) -> None:
    """NaN, Infinity and overflowing literals written in place of a number are not JSON: dead-lettered."""
    topic, body, _ = doc
    body = {**body, "zz": 0.5}
    payload = dumps(body).replace(b'"zz": 0.5', b'"zz": ' + token)
    out = decode(topic, payload)
    assert isinstance(out, DeadLetter) and "JSON" in out.reason, out


@PURE
@given(doc=valid_documents, depth=st.integers(1024, 5000))
def test_deep_nesting_is_dead_lettered(doc: Valid, depth: int) -> None:
    """A document nested past the parser's depth limit is dead-lettered, whatever its topic."""
    topic, body, _ = doc
    payload = dumps(body)[:-1] + b', "deep": ' + b"[" * depth + b"]" * depth + b"}"
    out = decode(topic, payload)
    assert isinstance(out, DeadLetter) and out.reason, out


@PURE
@given(doc=valid_documents, pad=st.integers(64 * 1024, 80 * 1024))
def test_oversized_payloads_are_dead_lettered(doc: Valid, pad: int) -> None:
    """A valid document padded past 64 KiB is dead-lettered with the limit as its reason."""
    topic, body, _ = doc
    payload = dumps({**body, "pad": "x" * pad})
    out = decode(topic, payload)
    assert isinstance(out, DeadLetter) and "exceeds" in out.reason, out


@PURE
@given(
    topic=st.builds(
        lambda prefix, device: f"{prefix}/{device}/reading",
        st.sampled_from(["meters", "vehicles"]),
        st.text(min_size=1, max_size=20).filter(lambda s: not topics.DEVICE_ID.match(s) and "/" not in s),
    )
)
def test_unicode_ids_in_topics_are_dead_lettered(topic: str) -> None:
    """A device id outside `[A-Za-z0-9_.:-]{1,64}` in the topic is dead-lettered, its reason naming the id."""
    out = decode(topic, b'{"totalPowerKw": 1, "soc": 1}')
    assert isinstance(out, DeadLetter) and "invalid device id" in out.reason, out


@PURE
@given(doc=st.one_of(meter_readings(), vehicle_readings(), pump_statuses(), pump_events()), other=st.text(min_size=1))
def test_an_id_in_the_payload_must_match_the_topic(doc: Valid, other: str) -> None:
    """An id in the payload (unicode, SQL-looking, anything) that differs from the topic's is dead-lettered."""
    topic, body, _ = doc
    device = topic.split("/")[1]
    field = {"meters": "meterId", "vehicles": "vehicleId", "pumps": "device_id"}[topic.split("/")[0]]
    if other == device:
        other += "x"
    out = decode(topic, dumps({**body, field: other}))
    assert isinstance(out, DeadLetter) and "differs" in out.reason, out


@PURE
@given(
    topic=st.builds(lambda p, i: f"{p}/{i}/online", st.sampled_from(["meters", "vehicles", "pumps"]), device_ids),
    form=st.sampled_from(
        [
            (b"online", True),
            (b"offline", False),
            (b" ONLINE\n", True),
            (b'"online"', True),
            (b'"Offline"', False),
            (b'{"online": true}', True),
            (b'{"online": false}', False),
            (b"", False),
        ]
    ),
)
def test_presence_forms(topic: str, form: tuple[bytes, bool]) -> None:
    """Every presence form the contract names decodes to the right flag."""
    payload, online = form
    out = decode(topic, payload)
    assert isinstance(out, Message)
    assert out.records == [Presence(out.kind, topic.split("/")[1], online)]


@PURE
@given(topic=st.builds(lambda p, i: f"{p}/{i}/cmd", st.sampled_from(["meters", "vehicles", "pumps"]), device_ids))
def test_our_own_commands_are_skipped(topic: str) -> None:
    """A `…/cmd` message (ours, echoed by the subscription) is neither stored nor dead-lettered."""
    assert decode(topic, b'{"commandId": "x", "command": "pump"}') is None


@PURE
@given(stamp=st.one_of(st.text(max_size=30), st.text("0123456789²³¹٣", min_size=1, max_size=30)))
def test_timestamps_of_any_text(stamp: str) -> None:
    """Any text as a timestamp (unicode digits, 5000-digit numbers) is a reading or an explained dead letter."""
    decode("meters/m1/reading", dumps({"totalPowerKw": 1.0, "timestamp": stamp}))
    decode("meters/m1/reading", dumps({"totalPowerKw": 1.0, "timestamp": "9" * 5000}))


# ---- the API: every POST body --------------------------------------------------------------------------


def explained(response: httpx.Response, sent: bytes) -> None:
    """Never a 5xx; every 4xx is the error shape with a message, and a 422 lists details."""
    where = f"{response.request.method} {response.request.url} with {sent[:300]!r}"
    assert response.status_code < 500, f"{where} → {response.status_code} {response.text}"
    if response.status_code < 400:
        return
    assert response.headers["content-type"].startswith("application/json"), where
    error = response.json()["error"]
    assert isinstance(error["code"], str) and error["code"], where
    assert isinstance(error["message"], str) and error["message"].strip(), where
    if response.status_code == 422:
        details = error.get("details")
        assert isinstance(details, list) and details, f"{where}: a 422 lists details: {response.text}"
        assert all(isinstance(d, dict) and d.get("field") and d.get("message") for d in details), where


def bodies(near_valid: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[bytes]:
    """Raw bytes, any JSON, and documents one field away from valid."""

    @st.composite
    def mutate(draw: st.DrawFn) -> bytes:
        body = dict(draw(near_valid))
        how = draw(st.sampled_from(["replace", "delete", "add", "deep", "nul"]))
        key = draw(st.sampled_from(sorted(body))) if body else "x"
        if how == "replace":
            body[key] = draw(json_values)
        elif how == "delete":
            body.pop(key, None)
        elif how == "add":
            body[draw(FIELD_NAMES | st.text(max_size=12))] = draw(json_values)
        elif how == "nul":
            body[key if draw(st.booleans()) else "note\x00"] = draw(st.text(max_size=5)) + "\x00"
        else:  # nested as deep as the parser allows, or one level past it
            depth = draw(st.integers(1, 1030))
            return dumps(body)[:-1] + b', "deep": ' + b"[" * depth + b'"x"' + b"]" * depth + b"}"
        return dumps(body)

    valid = near_valid.map(dumps)
    # valid documents twice over, so acceptance is exercised as well as every kind of rejection
    return st.one_of(valid, mutate(), valid, raw_payloads, json_values.map(dumps))


def correlations(meter: str, vehicle: str) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({"vehicleId": st.just(vehicle), "meterId": st.just(meter)})


def commands_to(pump: str) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {"command": st.sampled_from(["pump", "auto_mode", "reboot", "set_interval", "pump_on"]) | SQLISH},
        optional={
            "state": st.sampled_from(["on", "off", "ON", "maybe"]),
            "enabled": st.booleans(),
            "force": st.booleans(),
            "interval": st.integers(),
            "note": SQLISH | st.text(max_size=10),
        },
    )


def read_obis_bodies() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({"obisCodes": st.lists(obis_codes, min_size=1, max_size=5)})


def write_obis_bodies() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {"obisCode": obis_codes, "value": st.integers() | finite(-1e9, 1e9) | st.text(max_size=20) | st.booleans()}
    )


def answer_read_obis(command: dict[str, Any]) -> dict[str, Any]:
    """A meter that knows every code: 42.0 for each."""
    readings = [{"obisCode": c, "value": 42.0, "unit": "kWh"} for c in command.get("obisCodes", [])]
    return {"commandId": command["commandId"], "status": "ok", "data": {"readings": readings}}


# the bridge's and the server's threads draw from `random` while hypothesis generates in this one
@pytest.mark.filterwarnings("ignore:Do not use the `random` module:hypothesis.errors.HypothesisDeprecationWarning")
async def test_every_post_body_is_answered_without_a_500(
    api_server: ApiServer, publisher: Publisher, fake_device: Callable[..., FakeDevice]
) -> None:
    """Random bytes, any JSON and near-valid documents on every POST endpoint: 2xx or an explained 4xx."""
    meter, vehicle, pump = unique("fz-m"), unique("fz-v"), unique("fz-p")
    url = api_server.settings.core.database_url
    # the meter and the pump exist (so commands reach body validation) and answer their commands
    publisher.publish(f"meters/{meter}/reading", orjson.dumps({"totalPowerKw": 1.0}))
    publisher.publish(f"pumps/{pump}/status", orjson.dumps(status_doc(pump)))
    await wait_for_rows(url, "SELECT 1 FROM devices WHERE device_id IN (%s, %s)", (meter, pump), 2)
    fake_device("meters", meter, answer_read_obis)
    fake_device("pumps", pump)
    ingest_meter = meter_readings(meter, http=True).map(lambda d: d[1])
    ingest_vehicle = vehicle_readings(vehicle, http=True).map(lambda d: d[1])
    endpoints: list[tuple[str, st.SearchStrategy[dict[str, Any]]]] = [
        ("/v1/ingestion/meter", ingest_meter),
        ("/v1/ingestion/vehicle", ingest_vehicle),
        ("/v1/ingest", st.one_of(ingest_meter, ingest_vehicle)),
        ("/v1/ingestion/correlate", correlations(meter, vehicle)),
        ("/api/v1/devices/status/update", pump_statuses(pump, http=True).map(lambda d: d[1])),
        ("/api/v1/devices/events/pump", pump_events(pump, http=True).map(lambda d: d[1])),
        (f"/api/v1/devices/{pump}/commands", commands_to(pump)),
        (f"/api/meters/{meter}/read-obis", read_obis_bodies()),
        (f"/api/meters/{meter}/write-obis", write_obis_bodies()),
    ]
    valid: dict[str, Any] = {
        "/v1/ingestion/meter": {"meterId": meter, "totalPowerKw": 1.5},
        "/v1/ingestion/vehicle": {"vehicleId": vehicle, "soc": 50},
        "/v1/ingest": {"meterId": meter, "voltage": 230.0},
        "/v1/ingestion/correlate": {"vehicleId": vehicle, "meterId": meter},
        "/api/v1/devices/status/update": status_doc(pump),
        "/api/v1/devices/events/pump": {"device_id": pump, "event": "pump_started"},
        f"/api/v1/devices/{pump}/commands": {"command": "pump", "state": "off"},
        f"/api/meters/{meter}/read-obis": {"obisCodes": ["1-0:1.8.0.255"]},
        f"/api/meters/{meter}/write-obis": {"obisCode": "1-0:1.8.0.255", "value": 1},
    }
    statuses: dict[str, set[int]] = {}

    def fuzz(path: str, near_valid: st.SearchStrategy[dict[str, Any]]) -> None:
        with httpx.Client(base_url=api_server.base_url, headers=api_server.headers, timeout=30) as http:

            @HTTP
            @given(body=bodies(near_valid))
            def post(body: bytes) -> None:
                r = http.post(path, content=body, headers={"content-type": "application/json"})
                statuses.setdefault(path, set()).add(r.status_code)
                explained(r, body)

            post()
            # and one body that must be accepted, so every endpoint is seen working, not only refusing
            r = http.post(path, json=valid[path])
            statuses.setdefault(path, set()).add(r.status_code)
            assert r.status_code in (200, 201, 202), (path, r.status_code, r.text)
            for body in (b"", b"x" * (1024 * 1024 + 1)):  # empty and over the 1 MiB limit
                r = http.post(path, content=body)
                explained(r, body)
                assert r.status_code == (400 if not body else 413), r.text

    for path, near_valid in endpoints:
        await asyncio.to_thread(fuzz, path, near_valid)
    # the near-valid documents reach acceptance too: the properties above were not only about rejections
    accepted = {path for path, codes in statuses.items() if codes & {200, 201, 202}}
    assert accepted == {path for path, _ in endpoints}, statuses


@PURE
@given(device_id=st.text(max_size=80) | st.text(ID_CHARS, max_size=70).map(lambda s: s + "\n") | SQLISH)
def test_the_device_id_rule_is_exact(device_id: str) -> None:
    """Only `[A-Za-z0-9_.:-]{1,64}` names a device: not unicode, not SQL, not an id with a trailing newline."""
    exact = 0 < len(device_id) <= 64 and all(c in ID_CHARS for c in device_id)
    assert bool(topics.DEVICE_ID.match(device_id)) == exact
    assert isinstance(decode(f"meters/{device_id}/reading", b'{"voltage": 230}'), Message) == exact


async def test_any_device_id_in_a_path_is_a_404_not_a_500(api_server: ApiServer) -> None:
    """Unicode, SQL-looking, NUL and over-long ids in every path with an id: 404 (or 400), never a 500."""
    ids = ["mètre", "'); DROP TABLE devices;--", "a\x00b", "x" * 65, "%", " ", "..", "a/b", "💥", "1 OR 1=1"]

    def probe() -> None:
        with httpx.Client(base_url=api_server.base_url, headers=api_server.headers, timeout=30) as http:
            for raw in ids:
                quoted = quote(raw, safe="")
                for method, template in (
                    ("GET", "/api/meters/{}/current-block"),
                    ("GET", "/api/meters/{}/blocks/today"),
                    ("GET", "/v1/analytics/performance/{}"),
                    ("GET", "/api/v1/devices/{}/status"),
                    ("GET", "/api/v1/devices/{}/history"),
                    ("GET", "/api/v1/devices/{}/commands"),
                    ("GET", "/api/v1/devices/{}/commands/" + quoted),
                    ("POST", "/api/v1/devices/{}/commands"),
                    ("GET", "/api/meters/{}/obis-readings"),
                    ("GET", "/api/meters/{}/obis-readings/history"),
                    ("POST", "/api/meters/{}/read-obis"),
                    ("POST", "/api/meters/{}/write-obis"),
                ):
                    body = b'{"command": "reboot", "obisCodes": ["1-0:1.8.0.255"], "obisCode": "1-0:1.8.0", "value": 1}'
                    r = http.request(method, template.format(quoted), content=body if method == "POST" else None)
                    explained(r, body)
                    assert r.status_code in (400, 404), f"{method} {template.format(quoted)} → {r.status_code}"

    await asyncio.to_thread(probe)


# ---- SQL-looking strings are data ------------------------------------------------------------------------

SQL_EVENT = "'); DROP TABLE devices;--"
SQL_NOTE = 'Robert"); DELETE FROM pump_events; SELECT pg_sleep(10);--'
SQL_UNIT = "kWh'; DROP TABLE x;--"
SQL_QUALITY = "' OR '1'='1"


async def test_sql_looking_strings_are_stored_verbatim(api_server: ApiServer, publisher: Publisher) -> None:
    """A pump event named `'); DROP TABLE devices;--` and SQL-looking OBIS units land as data, read back verbatim."""
    pump, meter = unique("fz-sql-p"), unique("fz-sql-m")
    url = api_server.settings.core.database_url
    stamp = int((datetime.now(UTC) - timedelta(seconds=30)).timestamp() * 1000)
    extra = {"note": SQL_NOTE, "unicode": "ünïcødé ☃ 𝄞 \u202e", "percent": "%s %(x)s $1"}
    publisher.publish(f"pumps/{pump}/event", orjson.dumps({"event": SQL_EVENT, "timestamp": stamp, **extra}))
    publisher.publish(
        f"meters/{meter}/obis",
        orjson.dumps(
            {"readings": [{"obisCode": "1-0:1.8.0.255", "value": 7, "unit": SQL_UNIT, "quality": SQL_QUALITY}]}
        ),
    )
    async with api_server.client() as http:
        over_http = await http.post(
            "/api/v1/devices/events/pump", json={"device_id": pump, "event": SQL_NOTE[:64], "note": SQL_EVENT}
        )
    assert over_http.status_code == 202, over_http.text

    rows = await wait_for_rows(
        url, "SELECT event, payload FROM pump_events WHERE device_id = %s ORDER BY event", (pump,), 2
    )
    assert {r[0] for r in rows} == {SQL_EVENT, SQL_NOTE[:64]}
    by_event = {r[0]: r[1] for r in rows}
    assert {k: by_event[SQL_EVENT][k] for k in extra} == extra
    assert by_event[SQL_NOTE[:64]]["note"] == SQL_EVENT
    await wait_for_rows(url, "SELECT 1 FROM obis_latest WHERE meter_id = %s", (meter,), 1)
    async with api_server.client() as http:
        obis = (await http.get(f"/api/meters/{meter}/obis-readings")).json()
    assert [(o["unit"], o["quality"], o["value"]) for o in obis] == [(SQL_UNIT, SQL_QUALITY, 7.0)]
    # and the tables the strings name are all still there
    tables = query(url, "SELECT count(*) FROM devices WHERE device_id IN (%s, %s)", (pump, meter))
    assert tables == [(2,)]


async def test_rejected_messages_are_dead_lettered_with_their_reason(
    publisher: Publisher, api_server: ApiServer
) -> None:
    """A unicode id, NaN, a NUL PostgreSQL refuses, nesting too deep to write back: dead-lettered whole, with a
    reason, and the bridge goes on storing."""
    device = unique("fz-dl")
    url = api_server.settings.core.database_url
    cases = {
        f"meters/mètre-{device}/reading": b'{"totalPowerKw": 1}',
        f"meters/{device}/reading": b'{"totalPowerKw": NaN}',
        f"pumps/{device}/event": orjson.dumps({"event": "nul", "note": "a\u0000b"}),
        f"pumps/{device}-deep/event": b'{"event": "deep", "n": ' + b"[" * 300 + b"]" * 300 + b"}",
    }
    for topic, payload in cases.items():
        publisher.publish(topic, payload)
    publisher.publish(f"pumps/{device}-deep/event", b'{"event": "after"}')
    rows = await wait_for_rows(
        url,
        "SELECT topic, payload, reason FROM dead_letters WHERE topic = ANY(%s)",
        (list(cases),),
        len(cases),
    )
    for topic, payload, reason in rows:
        assert bytes(payload) == cases[topic] and reason.strip(), (topic, reason)
    await wait_for_rows(url, "SELECT 1 FROM pump_events WHERE device_id = %s", (f"{device}-deep",), 1)
