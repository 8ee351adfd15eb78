"""Tasmota, Shelly Gen2 and ESPHome messages as the firmwares' documentation shows them.

Each payload names the page it was taken from. Tests send them unchanged, or with only the device's time
moved to now (`tasmota_at`, `shelly_at`) so that the readings land in today's blocks.
"""

from __future__ import annotations

import copy
from datetime import datetime
from typing import Any

import orjson

# ---- Tasmota --------------------------------------------------------------------------------------

# https://blog.mylocalbytes.com/kb/2022-01-10/LB-PM-Power-Monitoring (a Tasmota plug's tele/<topic>/SENSOR;
# field set as in https://tasmota.github.io/docs/Teleinfo/ "MQTT result should look like that")
TASMOTA_SENSOR: dict[str, Any] = {
    "Time": "2022-01-11T21:57:38",
    "ENERGY": {
        "TotalStartTime": "2020-10-21T22:15:00",
        "Total": 3.705,
        "Yesterday": 0.028,
        "Today": 0.026,
        "Period": 1,
        "Power": 5,
        "ApparentPower": 5,
        "ReactivePower": 0,
        "Factor": 1.00,
        "Voltage": 233,
        "Current": 0.021,
    },
}

# https://tasmota.github.io/docs/Teleinfo/ (compteur/tele/SENSOR: ENERGY without Voltage/Factor, plus IP/MAC)
TASMOTA_SENSOR_TELEINFO: dict[str, Any] = {
    "Time": "2021-03-13T09:20:26",
    "ENERGY": {
        "TotalStartTime": "2021-03-13T09:20:26",
        "Total": 7970.903,
        "Yesterday": 3.198,
        "Today": 6.024,
        "Period": 63,
        "Power": 860,
        "Current": 4.000,
    },
    "IP": "192.168.xx.xx",
    "MAC": "50:02:91:xx:xx:xx",
}

# https://tasmota.github.io/docs/ADC/ ("11:14:59 MQT: tele/tasmota/STATE = …")
TASMOTA_STATE: dict[str, Any] = {
    "Time": "2019-10-31T11:14:59",
    "Uptime": "0T18:36:12",
    "UptimeSec": 66972,
    "Vcc": 3.423,
    "Heap": 28,
    "SleepMode": "Dynamic",
    "Sleep": 50,
    "LoadAvg": 19,
    "MqttCount": 6,
    "POWER": "OFF",
    "Wifi": {
        "AP": 1,
        "SSId": "Tasmota",
        "BSSId": "00:00:00:00:00:00",
        "Channel": 13,
        "RSSI": 100,
        "LinkCount": 1,
        "Downtime": "0T00:00:06",
    },
}

# https://tasmota.github.io/docs/MQTT/#command-flow: `cmnd/tasmota_switch/Power TOGGLE`
#   ↳ stat/tasmota_switch/RESULT → {"POWER":"ON"}   ↳ stat/tasmota_switch/POWER → ON
TASMOTA_RESULT_ON = b'{"POWER":"ON"}'
TASMOTA_RESULT_OFF = b'{"POWER":"OFF"}'
TASMOTA_POWER_ON = b"ON"

# tele/<topic>/LWT: `Online` once connected, `Offline` as the will
# (https://tasmota.github.io/docs/MQTT/, https://tasmota.github.io/docs/DeepSleep/ "MQT: …/LWT = Offline")
TASMOTA_LWT_ONLINE = b"Online"
TASMOTA_LWT_OFFLINE = b"Offline"

# https://tasmota.github.io/docs/Smart-Meter-Interface/ "Hager EHZ363 (SML)": meter `+1,3,s,0,9600,SML` with
#   1,77070100010800ff@1000,Total consumption,KWh,Total_in,4
#   1,77070100020800ff@1000,Total Feed,KWh,Total_out,4
#   1,77070100100700ff@1,Current consumption,W,Power_curr,0
#   1,77070100000009ff@#,Meter Nr,,Meter_number,0
# published in tele/<topic>/SENSOR under the meter's JSON prefix with the descriptor's MQTT labels:
TASMOTA_SML: dict[str, Any] = {
    "Time": "2022-07-07T13:01:11",
    "SML": {"Total_in": 34507.4761, "Total_out": 14737.1422, "Power_curr": 894, "Meter_number": "0901454d48000000000"},
}

# ---- Shelly Gen2 -----------------------------------------------------------------------------------

# https://shelly-api-docs.shelly.cloud/gen2/ComponentsAndServices/Switch#status (Switch.GetStatus example);
# published whole on <topic_prefix>/status/switch:0 (https://shelly-api-docs.shelly.cloud/gen2/ComponentsAndServices/Mqtt)
SHELLY_SWITCH_STATUS: dict[str, Any] = {
    "id": 0,
    "source": "timer",
    "output": True,
    "timer_started_at": 1626935739.79,
    "timer_duration": 60,
    "apower": 8.9,
    "voltage": 237.5,
    "current": 0.04,
    "aenergy": {"total": 6.532, "by_minute": [45.199, 47.141, 88.397], "minute_ts": 1626935779},
    "temperature": {"tC": 23.5, "tF": 74.4},
}

# https://shelly-api-docs.shelly.cloud/gen2/General/Notifications#notifystatus (on <shelly-id>/events/rpc)
SHELLY_NOTIFY_STATUS: dict[str, Any] = {
    "src": "shellypro4pm-f008d1d8b8b8",
    "dst": "user_1",
    "method": "NotifyStatus",
    "params": {"ts": 1631266595.43, "switch:0": {"id": 0, "output": True, "source": "button"}},
}

# NotifyStatus with a new energy count only (aenergy changes each minute), same frame shape
SHELLY_NOTIFY_ENERGY: dict[str, Any] = {
    "src": "shellyplus1pm-441793d69718",
    "dst": "user_1",
    "method": "NotifyStatus",
    "params": {
        "ts": 1631266655.43,
        "switch:0": {"id": 0, "aenergy": {"by_minute": [0.0, 45.199, 47.141], "minute_ts": 1631266620, "total": 7.0}},
    },
}

# https://shelly-api-docs.shelly.cloud/gen2/General/RPCProtocol (request and response frames) and
# https://shelly-api-docs.shelly.cloud/gen2/ComponentsAndServices/Switch#switchset (result `{"was_on": …}`)
SHELLY_SET_RESULT: dict[str, Any] = {"was_on": False}
SHELLY_ERROR: dict[str, Any] = {"code": -103, "message": "Invalid argument 'id': no such component"}

# <topic_prefix>/online: `true` when connected, `false` as the will
SHELLY_ONLINE = b"true"
SHELLY_OFFLINE = b"false"

# ---- ESPHome ---------------------------------------------------------------------------------------

# https://esphome.io/components/mqtt.html: `<TOPIC_PREFIX>/status` `online` (birth) / `offline` (will),
# states on `<TOPIC_PREFIX>/<COMPONENT_TYPE>/<COMPONENT_NAME>/state`, commands on `…/command`;
# sensor names of https://esphome.io/components/sensor/hlw8012.html ("HLW8012 Power" → hlw8012_power …) and
# https://esphome.io/components/sensor/total_daily_energy.html ("Total Daily Energy", kWh via the 0.001 filter)
ESPHOME_ONLINE = b"online"
ESPHOME_OFFLINE = b"offline"
ESPHOME_SENSORS: dict[str, bytes] = {
    "hlw8012_power": b"1200.0",
    "hlw8012_voltage": b"230.5",
    "hlw8012_current": b"5.21",
    "total_daily_energy": b"1.000",
}
ESPHOME_SWITCH_ON = b"ON"
ESPHOME_SWITCH_OFF = b"OFF"


# ---- helpers ---------------------------------------------------------------------------------------


def dumps(doc: Any) -> bytes:
    return orjson.dumps(doc)


def tasmota_at(doc: dict[str, Any], local: datetime, **energy: Any) -> bytes:
    """The documented SENSOR/STATE with `Time` moved to `local` (naive, the device's clock) and ENERGY changed."""
    out = copy.deepcopy(doc)
    out["Time"] = local.strftime("%Y-%m-%dT%H:%M:%S")
    if energy:
        out["ENERGY"].update(energy)
    return dumps(out)


def shelly_at(doc: dict[str, Any], ts: float, **component: Any) -> bytes:
    """The documented NotifyStatus with `ts` moved and `switch:0` changed."""
    out = copy.deepcopy(doc)
    out["params"]["ts"] = ts
    out["params"]["switch:0"].update(component)
    return dumps(out)
