"""Adapters decoding the firmwares' documented payloads into the records native devices produce."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge import adapters, topics
from bridge.adapters import Adapters, Context, parse_specs
from bridge.config import Settings
from bridge.errors import ConfigError
from bridge.telemetry import (
    CommandResult,
    DeadLetter,
    Decoder,
    Message,
    MeterReading,
    ObisReading,
    Presence,
    PumpStatus,
)

from . import adapter_payloads as doc

BERLIN = ZoneInfo("Europe/Berlin")
NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
SPECS = (
    "tasmota:meter=%prefix%/%topic%/; tasmota:pump=tasmota/pumps/%topic%/%prefix%/;"
    "shelly:pump=shellies/+; shelly:meter=shellyplus1pm-441793d69718;"
    "esphome:meter=esphome/+; esphome:pump=wells/+"
)


def registry(specs: str = SPECS) -> Adapters:
    return Adapters(parse_specs(specs), Context(BERLIN))


def message(item: object) -> Message:
    assert isinstance(item, Message), item
    return item


def only(records: list[object], kind: type) -> list:
    return [r for r in records if isinstance(r, kind)]


# ---- configuration ----------------------------------------------------------------------------------


def test_specs_parse_firmware_kind_and_pattern() -> None:
    """ADAPTERS entries read as firmware, kind (meter by default) and topic pattern."""
    specs = parse_specs("tasmota=%prefix%/%topic%/ ; shelly:pump=shellies/+")
    assert [(s.firmware, s.kind, s.pattern) for s in specs] == [
        ("tasmota", "meter", "%prefix%/%topic%/"),
        ("shelly", "pump", "shellies/+"),
    ]
    assert parse_specs("") == ()
    settings = Settings.from_env({"ADAPTERS": "esphome:pump=esphome/+", "SHELLY_RPC_SRC": "site-a/api"})
    assert settings.adapters == parse_specs("esphome:pump=esphome/+")
    assert settings.shelly_rpc_src == "site-a/api"


@pytest.mark.parametrize(
    "text",
    [
        "zigbee=z2m/+",  # unknown firmware
        "tasmota:vehicle=%prefix%/%topic%/",  # not a meter or pump
        "tasmota=%prefix%/plugs/",  # no %topic%
        "shelly=shellies/+/+",  # two device levels
        "esphome=meters/+",  # the bridge's own topics
        "esphome=esp/#",
        "shelly",
    ],
)
def test_specs_refuse_what_cannot_work(text: str) -> None:
    """A malformed ADAPTERS entry is a configuration error naming the variable."""
    with pytest.raises(ConfigError, match="ADAPTERS"):
        parse_specs(text)


def test_subscriptions_cover_each_firmware_and_the_shelly_replies() -> None:
    """The bridge subscribes to the firmware topics it reads and to where Shelly answers our RPC."""
    subs = registry().subscriptions()
    for topic in (
        "tele/+/SENSOR",
        "tele/+/LWT",
        "stat/+/RESULT",
        "tasmota/pumps/+/tele/STATE",
        "shellies/+/events/rpc",
        "shellies/+/status/+",
        "shellies/+/online",
        "telemetry-api/pumps/+/rpc",
        "telemetry-api/meters/+/rpc",
        "esphome/+/status",
        "esphome/+/sensor/+/state",
        "wells/+/switch/+/state",
    ):
        assert topic in subs
    assert len(subs) == len(set(subs))
    assert topics.subscriptions("g", subs)[-1] == f"$share/g/{subs[-1]}"


def test_native_topics_stay_native_with_adapters_configured() -> None:
    """A native meter reading decodes as before; a topic no adapter owns is still an unknown topic."""
    decoder = Decoder(BERLIN, adapters=registry())
    item = message(decoder.decode("meters/m1/reading", b'{"totalPowerKw": 2}', NOW))
    assert item.kind == "meter" and item.address is None
    letter = decoder.decode("tele/plug1/INFO1", b"{}", NOW)
    assert isinstance(letter, DeadLetter) and "unknown topic" in letter.reason


# ---- Tasmota --------------------------------------------------------------------------------------------


def test_tasmota_sensor_energy_becomes_a_meter_reading_in_site_time() -> None:
    """ENERGY Total/Power/Voltage/Current/Factor map to the meter fields; Time is read in SITE_TIMEZONE."""
    item = message(registry().decode("tele/plug1/SENSOR", doc.dumps(doc.TASMOTA_SENSOR), NOW))
    assert (item.kind, item.device_id) == ("meter", "plug1")
    assert item.address == {"firmware": "tasmota", "topic": "cmnd/plug1/"}
    [reading] = item.records
    assert isinstance(reading, MeterReading)
    assert reading.ts == datetime(2022, 1, 11, 21, 57, 38, tzinfo=BERLIN)
    assert reading.energy_total_kwh == 3.705
    assert reading.power_kw == pytest.approx(0.005)
    assert (reading.voltage, reading.current, reading.power_factor) == (233, 0.021, 1.0)


def test_tasmota_teleinfo_sensor_without_voltage() -> None:
    """A SENSOR carrying only some ENERGY fields reads those and leaves the others empty."""
    [reading] = message(registry().decode("tele/linky/SENSOR", doc.dumps(doc.TASMOTA_SENSOR_TELEINFO), NOW)).records
    assert isinstance(reading, MeterReading)
    assert (reading.energy_total_kwh, reading.power_kw, reading.current) == (7970.903, 0.86, 4.0)
    assert reading.voltage is None and reading.power_factor is None


def test_tasmota_channels_add_up() -> None:
    """ENERGY arrays (one value per channel) are summed for power and energy, averaged for voltage."""
    sensor = {"Time": "2023-04-11T07:31:34", "ENERGY": {"Total": [1.0, 2.5], "Power": [52, 5], "Voltage": [230, 234]}}
    [reading] = message(registry().decode("tele/dual/SENSOR", orjson.dumps(sensor), NOW)).records
    assert isinstance(reading, MeterReading)
    assert (reading.energy_total_kwh, reading.power_kw, reading.voltage) == (3.5, 0.057, 232.0)


def test_tasmota_sml_labels_become_obis_readings_and_meter_fields() -> None:
    """Smart Meter Interface labels under the meter's JSON prefix become OBIS codes and meter fields."""
    item = message(registry().decode("tele/ehz363/SENSOR", doc.dumps(doc.TASMOTA_SML), NOW))
    [reading] = only(item.records, MeterReading)
    assert reading.energy_total_kwh == 34507.4761
    assert reading.power_kw == pytest.approx(0.894)
    codes = {r.obis_code: (r.value, r.unit) for r in only(item.records, ObisReading)}
    assert codes == {
        "1-0:1.8.0.255": (34507.4761, "kWh"),
        "1-0:2.8.0.255": (14737.1422, "kWh"),
        "1-0:16.7.0.255": (894.0, "W"),
    }


def test_tasmota_obis_named_labels_are_kept_as_obis() -> None:
    """A meter script naming its values by OBIS code (`1_8_0`) yields those OBIS readings, nothing guessed."""
    sensor = {"Time": "2024-01-15T14:30:00", "SM": {"1_8_0": 12.5, "16_7_0": 300, "96_1_0": "1EBZ01"}}
    item = message(registry().decode("tele/dd3/SENSOR", orjson.dumps(sensor), NOW))
    assert not only(item.records, MeterReading)
    assert {r.obis_code: r.value for r in only(item.records, ObisReading)} == {
        "1-0:1.8.0.255": 12.5,
        "1-0:16.7.0.255": 300.0,
    }


def test_tasmota_clock_not_set_means_received_time() -> None:
    """Before NTP Tasmota counts from 1970: such a Time is replaced by the time we received it."""
    sensor = dict(doc.TASMOTA_SENSOR, Time="1970-01-01T00:02:11")
    [reading] = message(registry().decode("tele/plug1/SENSOR", orjson.dumps(sensor), NOW)).records
    assert isinstance(reading, MeterReading) and reading.ts == NOW


def test_tasmota_lwt_is_presence() -> None:
    """LWT Online/Offline is the device's presence."""
    reg = registry()
    assert message(reg.decode("tele/plug1/LWT", doc.TASMOTA_LWT_ONLINE, NOW)).records == [
        Presence("meter", "plug1", True)
    ]
    assert message(reg.decode("tele/plug1/LWT", doc.TASMOTA_LWT_OFFLINE, NOW)).records == [
        Presence("meter", "plug1", False)
    ]


def test_tasmota_result_confirms_the_relay_state() -> None:
    """stat/RESULT {"POWER":"ON"} and stat/POWER ON answer the newest pending command asking for on."""
    reg = registry()
    [result] = message(reg.decode("stat/plug1/RESULT", doc.TASMOTA_RESULT_ON, NOW)).records
    assert isinstance(result, CommandResult)
    assert (result.device_id, result.ok, result.match) == ("plug1", True, {"relay": "on"})
    [plain] = message(reg.decode("stat/plug1/POWER", doc.TASMOTA_POWER_ON, NOW)).records
    assert isinstance(plain, CommandResult) and plain.match == {"relay": "on"}
    other = message(reg.decode("stat/plug1/RESULT", b'{"TelePeriod":300}', NOW))
    assert other.records == []


def test_tasmota_pump_relay_with_its_power() -> None:
    """Under a pump FullTopic the relay state is pump.running, with the power the last SENSOR metered."""
    reg = registry()
    topic = "tasmota/pumps/well1/tele/STATE"
    [status] = message(reg.decode(topic, doc.dumps(doc.TASMOTA_STATE), NOW)).records
    assert isinstance(status, PumpStatus) and status.status.pump.running is False
    assert status.ts == datetime(2019, 10, 31, 11, 14, 59, tzinfo=BERLIN)
    reg.decode("tasmota/pumps/well1/tele/SENSOR", doc.dumps(doc.TASMOTA_SENSOR), NOW)
    item = message(reg.decode("tasmota/pumps/well1/stat/RESULT", doc.TASMOTA_RESULT_ON, NOW))
    [pump] = only(item.records, PumpStatus)
    assert pump.status.pump.running is True and pump.status.pump.power_watts == 5.0
    assert pump.status.ground_tank.level_percent is None
    assert item.address == {"firmware": "tasmota", "topic": "tasmota/pumps/well1/cmnd/"}


def test_tasmota_bad_energy_value_is_a_dead_letter() -> None:
    """A non-numeric ENERGY value is dead-lettered with the device and the field named."""
    sensor = {"Time": "2022-01-11T21:57:38", "ENERGY": {"Total": "lots"}}
    letter = registry().decode("tele/plug1/SENSOR", orjson.dumps(sensor), NOW)
    assert isinstance(letter, DeadLetter) and letter.device_id == "plug1" and "ENERGY.Total" in letter.reason


# ---- Shelly ---------------------------------------------------------------------------------------------


def test_shelly_notify_status_overlays_the_last_known_status() -> None:
    """A NotifyStatus delta changes only what it carries: the power comes from the earlier full status."""
    reg = registry()
    first = message(reg.decode("shellies/pump-1/status/switch:0", doc.dumps(doc.SHELLY_SWITCH_STATUS), NOW))
    [status] = first.records
    assert isinstance(status, PumpStatus) and status.ts == NOW
    assert (status.status.pump.running, status.status.pump.power_watts) == (True, 8.9)
    assert first.address == {"firmware": "shelly", "rpc": "shellies/pump-1/rpc", "switch": 0}
    delta = doc.shelly_at(doc.SHELLY_NOTIFY_STATUS, 1631266595.43, output=False)
    [after] = message(reg.decode("shellies/pump-1/events/rpc", delta, NOW)).records
    assert isinstance(after, PumpStatus)
    assert after.ts == datetime.fromtimestamp(1631266595.43, UTC)
    assert (after.status.pump.running, after.status.pump.power_watts, after.status.pump.current_amps) == (
        False,
        8.9,
        0.04,
    )


def test_shelly_meter_reads_energy_in_kwh() -> None:
    """As a meter, switch:0 apower (W) and aenergy.total (Wh) become kW and a kWh register."""
    reg = registry()
    topic = "shellyplus1pm-441793d69718/status/switch:0"
    [reading] = message(reg.decode(topic, doc.dumps(doc.SHELLY_SWITCH_STATUS), NOW)).records
    assert isinstance(reading, MeterReading)
    assert reading.meter_id == "shellyplus1pm-441793d69718"
    assert (reading.power_kw, reading.energy_total_kwh, reading.voltage) == (
        pytest.approx(0.0089),
        pytest.approx(0.006532),
        237.5,
    )
    [later] = message(
        reg.decode("shellyplus1pm-441793d69718/events/rpc", doc.dumps(doc.SHELLY_NOTIFY_ENERGY), NOW)
    ).records
    assert isinstance(later, MeterReading)
    assert later.energy_total_kwh == pytest.approx(0.007) and later.power_kw == pytest.approx(0.0089)


def test_shelly_notifications_without_metering_store_nothing() -> None:
    """An output change alone on a meter, or a NotifyEvent, stores no reading (the device is still seen)."""
    reg = registry()
    item = message(reg.decode("shellyplus1pm-441793d69718/events/rpc", doc.dumps(doc.SHELLY_NOTIFY_STATUS), NOW))
    assert item.records == []
    event = {"src": "x", "dst": "y", "method": "NotifyEvent", "params": {"ts": 1, "events": []}}
    assert message(reg.decode("shellies/pump-1/events/rpc", orjson.dumps(event), NOW)).records == []


def test_shelly_bad_timestamp_is_a_dead_letter() -> None:
    """A NotifyStatus whose `ts` is no time is dead-lettered, not a decoder crash."""
    letter = registry().decode("shellies/s1/events/rpc", b'{"method":"NotifyStatus","params":{"ts":[]}}', NOW)
    assert isinstance(letter, DeadLetter) and "timestamp" in letter.reason


def test_shelly_online_is_presence() -> None:
    """<prefix>/online true/false is the device's presence."""
    reg = registry()
    assert message(reg.decode("shellies/pump-1/online", doc.SHELLY_ONLINE, NOW)).records == [
        Presence("pump", "pump-1", True)
    ]
    assert message(reg.decode("shellies/pump-1/online", doc.SHELLY_OFFLINE, NOW)).records == [
        Presence("pump", "pump-1", False)
    ]


def test_shelly_reply_answers_the_request_with_that_id() -> None:
    """A reply on <src>/rpc settles the command whose rpcId it carries; an error frame fails it."""
    reg = registry()
    ok = {
        "id": 17,
        "src": "shellyplus1-a8032ab12345",
        "dst": "telemetry-api/pumps/pump-1",
        "result": doc.SHELLY_SET_RESULT,
    }
    item = message(reg.decode("telemetry-api/pumps/pump-1/rpc", orjson.dumps(ok), NOW))
    [result] = item.records
    assert isinstance(result, CommandResult)
    assert (item.kind, result.device_id, result.ok, result.match) == ("pump", "pump-1", True, {"rpcId": 17})
    assert result.payload == {"status": "ok", "data": {"was_on": False}}
    bad = dict(ok, error=doc.SHELLY_ERROR)
    del bad["result"]
    [failed] = message(reg.decode("telemetry-api/pumps/pump-1/rpc", orjson.dumps(bad), NOW)).records
    assert isinstance(failed, CommandResult) and failed.ok is False
    assert failed.payload["message"] == doc.SHELLY_ERROR["message"]


# ---- ESPHome -----------------------------------------------------------------------------------------------


def test_esphome_states_add_up_to_full_readings() -> None:
    """Each sensor state yields a reading of all the node's latest values, in the meter fields' units."""
    reg = registry()
    readings = []
    for name, value in doc.ESPHOME_SENSORS.items():
        readings += message(reg.decode(f"esphome/kitchen/sensor/{name}/state", value, NOW)).records
    assert len(readings) == 4
    last = readings[-1]
    assert isinstance(last, MeterReading) and last.meter_id == "kitchen"
    assert (last.power_kw, last.voltage, last.current, last.energy_total_kwh) == (1.2, 230.5, 5.21, 1.0)
    unknown = message(reg.decode("esphome/kitchen/sensor/wifi_signal/state", b"-61", NOW))
    assert unknown.records == []
    assert message(reg.decode("esphome/kitchen/sensor/hlw8012_power/state", b"nan", NOW)).records == []


def test_esphome_retained_replay_is_remembered_not_stored() -> None:
    """States the broker replays on subscription are not new readings; a replayed status still counts."""
    reg = registry()
    assert reg.decode("esphome/kitchen/sensor/total_daily_energy/state", b"2.5", NOW, retained=True) is None
    status = message(reg.decode("esphome/kitchen/status", doc.ESPHOME_ONLINE, NOW, retained=True))
    assert status.records == [Presence("meter", "kitchen", True)]
    [live] = message(reg.decode("esphome/kitchen/sensor/hlw8012_power/state", b"100", NOW)).records
    assert isinstance(live, MeterReading) and live.energy_total_kwh == 2.5  # the replay was remembered


def test_esphome_switch_is_the_relay() -> None:
    """A switch state confirms relay commands; on a pump it is pump.running; a `pump` switch is preferred."""
    reg = registry()
    [status] = message(reg.decode("wells/well2/switch/pump/state", doc.ESPHOME_SWITCH_ON, NOW)).records[1:]
    assert isinstance(status, PumpStatus) and status.status.pump.running is True
    assert message(reg.decode("wells/well2/switch/led/state", b"OFF", NOW)).records == []
    item = message(reg.decode("esphome/kitchen/switch/relay/state", doc.ESPHOME_SWITCH_OFF, NOW))
    [result] = item.records
    assert isinstance(result, CommandResult) and result.match == {"relay": "off"}
    assert item.address == {"firmware": "esphome", "prefix": "esphome/kitchen", "switch": "relay"}
    assert reg.decode("esphome/kitchen/switch/relay/state", b"ON", NOW, retained=True) is None


def test_esphome_garbage_state_is_a_dead_letter_and_cleared_topics_are_ignored() -> None:
    """A sensor state that is no number is dead-lettered; an emptied retained topic is not."""
    reg = registry()
    letter = reg.decode("esphome/kitchen/sensor/hlw8012_power/state", b"lots", NOW)
    assert isinstance(letter, DeadLetter) and letter.device_id == "kitchen"
    assert reg.decode("esphome/kitchen/sensor/hlw8012_power/state", b"", NOW) is None


def test_device_names_are_made_valid_ids() -> None:
    """A firmware name with characters our ids do not allow is mapped to `_` and cut to 64."""
    item = message(registry().decode("esphome/küche 1/status", b"online", NOW))
    assert item.device_id == "k_che_1"
    assert adapters.device_id_of("x" * 80) == "x" * 64


# ---- commands ---------------------------------------------------------------------------------------------


def test_commands_in_each_dialect() -> None:
    """A relay command becomes cmnd/…/POWER, a Switch.Set frame or an ESPHome switch command."""
    tas = adapters.command({"firmware": "tasmota", "topic": "cmnd/plug1/"}, "meter", "plug1", "power", {"state": "on"})
    assert tas.messages == [("cmnd/plug1/POWER", b"ON")]
    assert tas.stored["relay"] == "on" and tas.stored["sentAs"] == [{"topic": "cmnd/plug1/POWER", "payload": "ON"}]
    address = {"firmware": "shelly", "rpc": "shellies/pump-1/rpc", "switch": 0}
    shelly = adapters.command(address, "pump", "pump-1", "pump", {"state": "off"}, rpc_src="site/api")
    [(topic, payload)] = shelly.messages
    frame = orjson.loads(payload)
    assert topic == "shellies/pump-1/rpc"
    assert frame == {
        "id": shelly.stored["rpcId"],
        "src": "site/api/pumps/pump-1",
        "method": "Switch.Set",
        "params": {"id": 0, "on": False},
    }
    esp = adapters.command(
        {"firmware": "esphome", "prefix": "esp/n1", "switch": "relay"}, "meter", "n1", "relay", {"state": "ON"}
    )
    assert esp.messages == [("esp/n1/switch/relay/command", b"ON")]


@pytest.mark.parametrize(
    ("address", "name", "params"),
    [
        ({"firmware": "tasmota", "topic": "cmnd/p/"}, "read_obis", {}),
        ({"firmware": "tasmota", "topic": "cmnd/p/"}, "pump", {"state": "half"}),
        ({"firmware": "esphome", "prefix": "esp/n1"}, "pump", {"state": "on"}),  # no switch seen yet
    ],
)
def test_commands_the_firmware_cannot_do_are_refused(address: dict, name: str, params: dict) -> None:
    """Anything but relay on/off, or a relay not yet known, is Unsupported (the API answers 422)."""
    with pytest.raises(adapters.Unsupported):
        adapters.command(address, "meter", "p", name, params)


# ---- robustness ----------------------------------------------------------------------------------------------

_FUZZ = registry()
_FUZZ_TOPICS = [
    "tele/p1/SENSOR",
    "tele/p1/STATE",
    "tele/p1/LWT",
    "stat/p1/RESULT",
    "stat/p1/POWER",
    "tasmota/pumps/p2/tele/SENSOR",
    "shellies/s1/events/rpc",
    "shellies/s1/status/switch:0",
    "shellies/s1/online",
    "telemetry-api/pumps/s1/rpc",
    "shellyplus1pm-441793d69718/status/em:0",
    "esphome/n1/sensor/power/state",
    "esphome/n1/switch/relay/state",
    "wells/n2/switch/pump/state",
    "esphome/n1/status",
]
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=20,
)
_SHAPED = st.fixed_dictionaries(
    {},
    optional={
        "Time": st.text(max_size=20) | st.integers(-(2**63), 2**63 - 1),
        "ENERGY": st.dictionaries(st.sampled_from(["Total", "Power", "Voltage", "Factor"]), _JSON, max_size=4),
        "SML": st.dictionaries(st.sampled_from(["Total_in", "Power_curr", "1_8_0"]), _JSON, max_size=3),
        "POWER": _JSON,
        "method": st.sampled_from(["NotifyStatus", "NotifyFullStatus"]),
        "params": st.dictionaries(st.sampled_from(["ts", "switch:0", "em:0", "emdata:0"]), _JSON, max_size=3),
        "id": _JSON,
        "result": _JSON,
        "error": _JSON,
        "apower": _JSON,
        "output": _JSON,
        "aenergy": _JSON,
    },
)


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from(_FUZZ_TOPICS),
    st.binary(max_size=64) | _JSON.map(orjson.dumps) | _SHAPED.map(orjson.dumps),
    st.booleans(),
)
def test_adapters_never_raise(topic: str, payload: bytes, retained: bool) -> None:
    """Whatever a firmware topic carries, decoding yields a message, a dead letter or nothing: never an error."""
    item = _FUZZ.decode(topic, payload, NOW, retained)
    assert item is None or isinstance(item, Message | DeadLetter)
