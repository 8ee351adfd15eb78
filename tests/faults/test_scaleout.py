"""Several bridges on one shared subscription split the load; one killed mid-stream loses nothing."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime, timedelta

import orjson
import pytest

from ..conftest import ROOT, Publisher, query, unique, wait_for_rows
from .conftest import free_port
from .test_faults import health


def start(db_url: str, mqtt_url: str, group: str, client_id: str, port: int) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "DATABASE_URL": db_url,
        "MQTT_URL": mqtt_url,
        "BRIDGE_CLIENT_ID": client_id,
        "BRIDGE_SHARED_GROUP": group,
        "BRIDGE_HEALTH": f"127.0.0.1:{port}",
        "SITE_TIMEZONE": "Europe/Berlin",
        "BRIDGE_BATCH_SIZE": "100",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "bridge"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 20
    while health(port) != 200:
        assert proc.poll() is None and time.monotonic() < deadline, "bridge did not start"
        time.sleep(0.1)
    return proc


def stored_by(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
        text = r.read().decode()
    match = re.search(r"^bridge_messages_received_total (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


@pytest.mark.timeout(180)
async def test_shared_subscription_splits_load_and_survives_a_kill(apache_url: str, mqtt_url: str) -> None:
    """Two bridges on `$share/…` both take messages; SIGKILL one mid-stream, restart it: all stored once."""
    group, meters = unique("g"), [unique("m") for _ in range(4)]
    ids, ports = [unique("bridge-a"), unique("bridge-b")], [free_port(), free_port()]
    procs = [start(apache_url, mqtt_url, group, ids[i], ports[i]) for i in range(2)]
    per_meter = 400
    base = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
    try:
        pub = Publisher(mqtt_url)
        infos = []
        for i in range(per_meter):
            ts = (base + timedelta(seconds=15 * i)).isoformat()
            for m in meters:
                payload = orjson.dumps({"totalPowerKw": 4.0, "timestamp": ts})
                infos.append(pub.client.publish(f"meters/{m}/reading", payload, qos=1))
            if i == per_meter // 3:
                await wait_for_rows(
                    apache_url,
                    "SELECT 1 FROM meter_readings WHERE meter_id = ANY(%s) LIMIT 300",
                    (meters,),
                    300,
                    within=30,
                )
                assert stored_by(ports[0]) > 0 and stored_by(ports[1]) > 0, "one bridge took no share"
                procs[0].send_signal(signal.SIGKILL)
                procs[0].wait(10)
            if i % 50 == 0:
                await asyncio.sleep(0.05)
        for info in infos:
            info.wait_for_publish(30)
        pub.close()
        procs[0] = start(apache_url, mqtt_url, group, ids[0], ports[0])
        total = per_meter * len(meters)
        await wait_for_rows(
            apache_url, "SELECT 1 FROM meter_readings WHERE meter_id = ANY(%s)", (meters,), total, within=60
        )
        assert query(
            apache_url,
            "SELECT count(*), count(DISTINCT (meter_id, ts)) FROM meter_readings WHERE meter_id = ANY(%s)",
            (meters,),
        ) == [(total, total)]
        # energy computed by two writers at once is still each reading once: 4 kW held 15 s, last one 5 min
        energy = query(
            apache_url,
            "SELECT meter_id, sum(total_kwh) FROM meter_blocks_30m WHERE meter_id = ANY(%s) GROUP BY meter_id",
            (meters,),
        )
        expected = round(4.0 * ((per_meter - 1) * 15 + 300) / 3600, 4)
        assert sorted(round(e[1], 4) for e in energy) == [expected] * len(meters)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
