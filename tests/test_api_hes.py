"""HES endpoints: polling status, OBIS reads and writes as MQTT commands, stored OBIS readings."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from .conftest import ApiServer, Publisher, unique, wait_for_rows
from .test_api_commands import FakeDevice, fake_device, silent, wait_status

pytestmark = pytest.mark.asyncio(loop_scope="session")
__all__ = ["fake_device"]  # the fixture, shared with the command tests


async def new_meter(api_server: ApiServer, publisher: Publisher, power_kw: float = 5.0) -> str:
    meter = unique("hes")
    publisher.publish(f"meters/{meter}/reading", orjson.dumps({"totalPowerKw": power_kw}))
    await wait_for_rows(
        api_server.settings.core.database_url, "SELECT 1 FROM meter_latest WHERE meter_id = %s", (meter,), 1
    )
    return meter


def answer_with(data: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def answer(command: dict[str, Any]) -> dict[str, Any]:
        return {"commandId": command["commandId"], "status": "ok", "data": data}

    return answer


async def test_polling_status(api_server: ApiServer, publisher: Publisher) -> None:
    """Counts, the newest report and each meter with its last reading."""
    meter = await new_meter(api_server, publisher, power_kw=7.5)
    async with api_server.client() as http:
        r = await http.get("/api/meters/polling/status", params={"limit": 1000})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["totalMeters"] >= 1 and body["onlineMeters"] >= 1
    assert body["totalMeters"] == body["onlineMeters"] + body["offlineMeters"]
    assert body["expectedIntervalSeconds"] == api_server.settings.core.expected_interval
    mine = {m["meterId"]: m for m in body["meters"]}[meter]
    assert mine["status"] == "online"
    assert datetime.fromisoformat(body["lastPollAt"]) >= datetime.fromisoformat(mine["lastReport"])
    assert mine["lastReading"]["totalPowerKw"] == 7.5
    assert datetime.fromisoformat(mine["lastReading"]["timestamp"]).tzinfo is not None


@pytest.mark.parametrize(
    "data",
    [
        {
            "readings": [
                {"obisCode": "1-0:1.8.0.255", "value": 12345, "scaler": -1, "unit": "kWh", "quality": "good"},
                {"obisCode": "1-0:32.7.0.255", "value": 230.1, "unit": "V"},
            ],
            "timestamp": "2026-01-02T03:04:05+00:00",
        },
        {"1-0:1.8.0.255": 1234.5, "1-0:32.7.0.255": 230.1, "timestamp": "2026-01-02T03:04:05+00:00"},
    ],
    ids=["readings-list", "flat"],
)
async def test_read_obis_answered(
    api_server: ApiServer, publisher: Publisher, fake_device: Callable[..., FakeDevice], data: dict[str, Any]
) -> None:
    """A meter answering the read_obis command gives 200 acked with its readings (value * 10^scaler)."""
    meter = await new_meter(api_server, publisher)
    device = fake_device("meters", meter, answer=answer_with(data))
    codes = ["1-0:1.8.0.255", "1-0:32.7.0.255"]
    async with api_server.client() as http:
        r = await http.post(f"/api/meters/{meter}/read-obis", json={"obisCodes": codes})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["meterId"] == meter and body["status"] == "acked"
    ((got, _),) = await device.commands(1)
    assert got == {"commandId": body["commandId"], "command": "read_obis", "obisCodes": codes}
    readings = {x["obisCode"]: x for x in body["readings"]}
    assert set(readings) == set(codes)
    assert readings["1-0:1.8.0.255"]["value"] == pytest.approx(1234.5)
    assert readings["1-0:32.7.0.255"]["value"] == pytest.approx(230.1)
    assert datetime.fromisoformat(readings["1-0:1.8.0.255"]["timestamp"]) == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


async def test_read_obis_refused(
    api_server: ApiServer, publisher: Publisher, fake_device: Callable[..., FakeDevice]
) -> None:
    """A meter refusing the read gives 200 failed with its message."""
    meter = await new_meter(api_server, publisher)

    def refuse(command: dict[str, Any]) -> dict[str, Any]:
        return {"commandId": command["commandId"], "status": "error", "message": "object undefined"}

    fake_device("meters", meter, answer=refuse)
    async with api_server.client() as http:
        r = await http.post(f"/api/meters/{meter}/read-obis", json={"obisCodes": ["0-0:96.1.0.255"]})
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "failed" and r.json()["message"] == "object undefined"
    assert r.json()["readings"] == []


async def test_read_obis_unanswered_is_202(
    api_server: ApiServer, publisher: Publisher, fake_device: Callable[..., FakeDevice]
) -> None:
    """Without an answer within READ_OBIS_WAIT the read is 202 sent, followable as a command."""
    meter = await new_meter(api_server, publisher)
    fake_device("meters", meter, answer=silent)
    async with api_server.client() as http:
        started = time.monotonic()
        r = await http.post(f"/api/meters/{meter}/read-obis", json={"obisCodes": ["1-0:1.8.0.255"]})
        waited = time.monotonic() - started
        assert r.status_code == 202, r.text
        assert r.json()["status"] == "sent"
        assert waited >= api_server.settings.read_obis_wait - 0.5
        follow = await http.get(f"/api/v1/devices/{meter}/commands/{r.json()['commandId']}")
        assert follow.status_code == 200 and follow.json()["command"] == "read_obis"


async def test_read_obis_validation_and_404(api_server: ApiServer, publisher: Publisher) -> None:
    """Bad OBIS codes are 422 naming each; an unknown meter is 404; a pump is not a meter."""
    meter = await new_meter(api_server, publisher)
    async with api_server.client() as http:
        r = await http.post(f"/api/meters/{meter}/read-obis", json={"obisCodes": ["1-0:1.8.0.255", "bogus", 7]})
        assert r.status_code == 422
        assert {d["field"] for d in r.json()["error"]["details"]} == {"obisCodes.1", "obisCodes.2"}
        r = await http.post(f"/api/meters/{meter}/read-obis", json={"obisCodes": []})
        assert r.status_code == 422
        for path in ("read-obis", "write-obis"):
            r = await http.post(f"/api/meters/{unique('ghost')}/{path}", json={"obisCodes": ["1-0:1.8.0.255"]})
            assert r.status_code == 404, path
        for path in ("obis-readings", "obis-readings/history"):
            r = await http.get(f"/api/meters/{unique('ghost')}/{path}")
            assert r.status_code == 404, path


async def test_obis_readings_latest_and_history(api_server: ApiServer, publisher: Publisher) -> None:
    """Latest per code from obis_latest; history newest first, filtered by code and time, paged."""
    meter = await new_meter(api_server, publisher)
    t1 = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=2)
    t2 = t1 + timedelta(hours=1)
    publisher.publish(
        f"meters/{meter}/obis",
        orjson.dumps(
            {
                "readings": [
                    {"obisCode": "1-0:1.8.0.255", "value": 1000, "scaler": -1, "unit": "kWh", "quality": "good"},
                    {"obisCode": "1-0:32.7.0.255", "value": 229.5, "unit": "V"},
                ],
                "timestamp": t1.isoformat(),
            }
        ),
    )
    publisher.publish(f"meters/{meter}/obis", orjson.dumps({"1-0:1.8.0.255": 1100, "timestamp": t2.isoformat()}))
    await wait_for_rows(
        api_server.settings.core.database_url, "SELECT 1 FROM obis_readings WHERE meter_id = %s", (meter,), 3
    )
    async with api_server.client() as http:
        latest = (await http.get(f"/api/meters/{meter}/obis-readings")).json()
        assert latest == [
            {
                "obisCode": "1-0:1.8.0.255",
                "value": 1100.0,
                "rawValue": 1100.0,
                "scaler": 0,
                "unit": None,
                "quality": None,
                "timestamp": latest[0]["timestamp"],
            },
            {
                "obisCode": "1-0:32.7.0.255",
                "value": 229.5,
                "rawValue": 229.5,
                "scaler": 0,
                "unit": "V",
                "quality": None,
                "timestamp": latest[1]["timestamp"],
            },
        ]
        assert datetime.fromisoformat(latest[0]["timestamp"]) == t2

        history = (await http.get(f"/api/meters/{meter}/obis-readings/history")).json()
        assert [(h["obisCode"], datetime.fromisoformat(h["timestamp"])) for h in history] == [
            ("1-0:1.8.0.255", t2),
            ("1-0:1.8.0.255", t1),
            ("1-0:32.7.0.255", t1),
        ]
        assert history[1]["value"] == pytest.approx(100.0) and history[1]["rawValue"] == 1000.0
        assert history[1]["scaler"] == -1 and history[1]["quality"] == "good"

        def get(**params: str) -> Any:
            return http.get(f"/api/meters/{meter}/obis-readings/history", params=params)

        only = (await get(obisCode="1-0:32.7.0.255")).json()
        assert [h["value"] for h in only] == [229.5]
        window = (await get(**{"from": (t1 + timedelta(minutes=1)).isoformat()})).json()
        assert [h["value"] for h in window] == [1100.0]
        before = (await get(to=t2.isoformat(), obisCode="1-0:1.8.0.255")).json()
        assert [h["value"] for h in before] == [pytest.approx(100.0)]
        paged = (await get(limit="1", offset="1")).json()
        assert [(h["obisCode"], h["rawValue"]) for h in paged] == [("1-0:1.8.0.255", 1000.0)]
        assert (await get(obisCode="nope")).status_code == 400
        assert (await get(**{"from": t2.isoformat(), "to": t1.isoformat()})).status_code == 400


async def test_write_obis(api_server: ApiServer, publisher: Publisher, fake_device: Callable[..., FakeDevice]) -> None:
    """write-obis is 202 with the command, the meter receives write_obis, and its answer acks it."""
    meter = await new_meter(api_server, publisher)
    device = fake_device("meters", meter)
    async with api_server.client() as http:
        r = await http.post(f"/api/meters/{meter}/write-obis", json={"obisCode": "0-0:96.3.10.255", "value": 1})
        assert r.status_code == 202, r.text
        body = r.json()
        assert body["meterId"] == meter and body["status"] in ("sent", "acked")
        ((got, props),) = await device.commands(1)
        assert got == {
            "commandId": body["commandId"],
            "command": "write_obis",
            "obisCode": "0-0:96.3.10.255",
            "value": 1,
        }
        assert props.ResponseTopic == f"meters/{meter}/cmd/result"
        await wait_status(http, meter, body["commandId"], "acked")

        r = await http.post(f"/api/meters/{meter}/write-obis", json={"obisCode": "x", "value": {"a": 1}})
        assert r.status_code == 422
        assert {d["field"] for d in r.json()["error"]["details"]} == {"obisCode", "value"}
