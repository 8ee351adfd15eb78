"""The naive bridge the benchmark compares against: the way most small MQTT-to-SQL bridges are written.

paho subscribes at QoS 1; `on_message` parses the JSON and does one INSERT and one COMMIT per message
on a plain psycopg connection. paho sends the PUBACK when the callback returns, so this one loses
nothing either; it is only slow. It stores meter readings only (that is all the benchmark sends).

    DATABASE_URL=… MQTT_URL=… python -m bench.naive
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from typing import Any

import paho.mqtt.client as mqtt
import psycopg
from paho.mqtt.enums import CallbackAPIVersion

from bridge.config import MqttUrl

INSERT = """
    INSERT INTO meter_readings (meter_id, ts, power_kw, kwh_consumed_ac, energy_total_kwh, voltage, current,
                                frequency, power_factor)
    VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)
    ON CONFLICT DO NOTHING
"""


def main() -> int:
    url = MqttUrl.parse(os.environ["MQTT_URL"])
    conn = psycopg.connect(os.environ["DATABASE_URL"])
    stop = threading.Event()

    def on_connect(client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        client.subscribe("meters/+/reading", qos=1)

    def on_subscribe(client: mqtt.Client, userdata: Any, mid: int, reasons: Any, properties: Any) -> None:
        print("subscribed", flush=True)

    def on_message(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        data = json.loads(msg.payload)
        meter_id = msg.topic.split("/")[1]
        conn.execute(
            INSERT,
            (
                meter_id,
                data.get("timestamp"),
                data.get("totalPowerKw"),
                data.get("kwhConsumedAc"),
                data.get("energyTotalKwh"),
                data.get("voltage"),
                data.get("current"),
                data.get("frequency"),
                data.get("powerFactor"),
            ),
        )
        conn.commit()

    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=os.environ.get("NAIVE_CLIENT_ID", f"naive-{os.getpid()}"),
        protocol=mqtt.MQTTv311,
    )
    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.connect(url.host, url.port)
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    client.loop_start()
    stop.wait()
    client.disconnect()
    client.loop_stop()
    conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
