"""Endpoints of HES, the head-end system reading meters by OBIS code (see ../shared/CONTRACT.md).

Reads and writes travel as MQTT commands (`read_obis`, `write_obis`) through `Commands`:
- read-obis waits up to READ_OBIS_WAIT seconds for the meter's answer: 200 with the readings when it
  answered (`acked`) or with its message when it refused (`failed`); 202 `{commandId, status: "sent"}`
  when it has not answered yet (follow it at `GET /api/v1/devices/{meterId}/commands/{commandId}`).
- write-obis does not wait: 202 `{meterId, commandId, status}`, followed the same way.
Readings a meter publishes on `meters/{id}/obis` are stored by the bridge and served by obis-readings.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from psycopg.rows import dict_row
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from bridge.errors import PayloadError
from bridge.telemetry import OBIS_CODE, ObisReadingsIn, to_datetime

from .commands import device_kind
from .errors import ApiError, Invalid, NotFound
from .responses import iso, json_response, paging, query_time, read_json

MAX_CODES = 100


async def require_meter(request: Request, meter_id: str) -> None:
    if await device_kind(request.state.services.pool, meter_id) != "meter":
        raise NotFound(f"unknown meter {meter_id!r}")


async def polling_status(request: Request) -> Response:
    """How the meters report: counts, the newest report, and each meter (paged by `limit`/`offset`)."""
    services = request.state.services
    limit, offset = paging(request)
    async with services.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            "SELECT count(*) AS total, count(*) FILTER (WHERE status = 'online') AS online, "
            "max(last_seen) AS last_poll FROM devices WHERE kind = 'meter'"
        )
        counts = await cur.fetchone()
        await cur.execute(
            """
            SELECT d.device_id, d.status, d.last_seen, l.ts, l.power_kw, l.kwh_consumed_ac, l.energy_total_kwh,
                   l.voltage, l.current, l.frequency, l.power_factor
            FROM devices d LEFT JOIN meter_latest l ON l.meter_id = d.device_id
            WHERE d.kind = 'meter' ORDER BY d.device_id LIMIT %s OFFSET %s
            """,
            (limit, offset),
        )
        rows = await cur.fetchall()
    assert counts is not None
    return json_response(
        {
            "totalMeters": counts["total"],
            "onlineMeters": counts["online"],
            "offlineMeters": counts["total"] - counts["online"],
            "expectedIntervalSeconds": services.settings.core.expected_interval,
            "lastPollAt": iso(counts["last_poll"]),
            "meters": [meter_json(r) for r in rows],
        }
    )


def meter_json(row: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"meterId": row["device_id"], "status": row["status"], "lastReport": iso(row["last_seen"])}
    if row["ts"] is not None:
        out["lastReading"] = {
            "timestamp": iso(row["ts"]),
            "totalPowerKw": row["power_kw"],
            "kwhConsumedAc": row["kwh_consumed_ac"],
            "energyTotalKwh": row["energy_total_kwh"],
            "voltage": row["voltage"],
            "current": row["current"],
            "frequency": row["frequency"],
            "powerFactor": row["power_factor"],
        }
    return out


def obis_codes(body: Any) -> list[str]:
    """The `obisCodes` of a read-obis body, without repeats; 422 naming each bad one."""
    codes = body.get("obisCodes") if isinstance(body, dict) else None
    if not isinstance(codes, list) or not 1 <= len(codes) <= MAX_CODES:
        raise Invalid(
            "invalid body",
            details=[{"field": "obisCodes", "message": f"a list of 1 to {MAX_CODES} OBIS codes is required"}],
        )
    bad = [
        {"field": f"obisCodes.{i}", "message": "not an OBIS code like 1-0:1.8.0.255"}
        for i, code in enumerate(codes)
        if not isinstance(code, str) or not OBIS_CODE.match(code)
    ]
    if bad:
        raise Invalid("invalid OBIS codes", details=bad)
    return list(dict.fromkeys(codes))


def readings_of(data: Any, request: Request) -> list[dict[str, Any]]:
    """The readings in a device's `read_obis` answer, in either OBIS payload form (or a bare list)."""
    if isinstance(data, list):
        data = {"readings": data}
    if not isinstance(data, dict):
        return []
    try:
        parsed = ObisReadingsIn.from_payload(data)
    except ValidationError:
        return []
    settings = request.state.services.settings.core
    now = datetime.now(UTC)
    try:
        ts = to_datetime(
            parsed.timestamp, tz=settings.site_timezone, received_at=now, max_future=settings.max_future_skew
        )
    except PayloadError:  # a bad stamp in an answer we asked for: the readings are still current
        ts = now
    return [
        {
            "obisCode": r.obisCode,
            "value": r.value * 10.0**r.scaler,
            "rawValue": r.value,
            "unit": r.unit,
            "scaler": r.scaler,
            "quality": r.quality,
            "timestamp": iso(ts),
        }
        for r in parsed.readings
    ]


async def read_obis(request: Request) -> Response:
    meter_id = request.path_params["id"]
    body = await read_json(request)
    await require_meter(request, meter_id)
    codes = obis_codes(body)
    services = request.state.services
    sent = await services.commands.send(
        meter_id, "meter", "read_obis", {"obisCodes": codes}, wait=services.settings.read_obis_wait
    )
    out: dict[str, Any] = {"meterId": meter_id, "commandId": sent["commandId"], "status": sent["status"]}
    result = sent["result"] if isinstance(sent["result"], dict) else {}
    if sent["status"] == "acked":
        out["readings"] = readings_of(result.get("data"), request)
        if result.get("message") is not None:
            out["message"] = result["message"]
        return json_response(out)
    if sent["status"] in ("failed", "expired"):
        out["readings"] = []
        out["message"] = result.get("message") or (
            "the meter refused the read" if sent["status"] == "failed" else "the meter did not answer in time"
        )
        return json_response(out)
    return json_response(out, 202)


async def write_obis(request: Request) -> Response:
    meter_id = request.path_params["id"]
    body = await read_json(request)
    await require_meter(request, meter_id)
    problems: list[dict[str, str]] = []
    code = body.get("obisCode") if isinstance(body, dict) else None
    if not isinstance(code, str) or not OBIS_CODE.match(code):
        problems.append({"field": "obisCode", "message": "an OBIS code like 0-0:96.3.10.255 is required"})
    value = body.get("value") if isinstance(body, dict) else None
    if value is None or isinstance(value, dict | list):
        problems.append({"field": "value", "message": "a number, string or boolean is required"})
    if problems:
        raise Invalid("invalid body", details=problems)
    sent = await request.state.services.commands.send(
        meter_id, "meter", "write_obis", {"obisCode": code, "value": value}
    )
    return json_response({"meterId": meter_id, "commandId": sent["commandId"], "status": sent["status"]}, 202)


def obis_json(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "obisCode": row["obis_code"],
        "value": row["value"],
        "rawValue": row["raw_value"],
        "scaler": row["scaler"],
        "unit": row["unit"],
        "quality": row["quality"],
        "timestamp": iso(row["ts"]),
    }


async def obis_latest(request: Request) -> Response:
    """The newest value of each OBIS code the meter reported."""
    meter_id = request.path_params["id"]
    await require_meter(request, meter_id)
    async with request.state.services.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            "SELECT obis_code, value, raw_value, scaler, unit, quality, ts FROM obis_latest "
            "WHERE meter_id = %s ORDER BY obis_code",
            (meter_id,),
        )
        rows = await cur.fetchall()
    return json_response([obis_json(r) for r in rows])


async def obis_history(request: Request) -> Response:
    """Stored OBIS readings, newest first, optionally of one `obisCode` and within `from`…`to`."""
    meter_id = request.path_params["id"]
    limit, offset = paging(request)
    code = request.query_params.get("obisCode") or None
    if code is not None and not OBIS_CODE.match(code):
        raise ApiError(400, f"obisCode: not an OBIS code: {code!r}")
    start = query_time(request, "from", None)
    end = query_time(request, "to", None)
    if start and end and start >= end:
        raise ApiError(400, "`from` must be before `to`")
    await require_meter(request, meter_id)
    # only the filters asked for, so a prepared plan never carries `$1 IS NULL OR …` past the index
    where, params = ["meter_id = %s"], [meter_id]
    for clause, value in (("obis_code = %s", code), ("ts >= %s", start), ("ts < %s", end)):
        if value is not None:
            where.append(clause)
            params.append(value)
    sql = (
        "SELECT obis_code, value, raw_value, scaler, unit, quality, ts FROM obis_readings "  # noqa: S608
        f"WHERE {' AND '.join(where)} ORDER BY ts DESC, obis_code LIMIT %s OFFSET %s"
    )
    async with request.state.services.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(sql, [*params, limit, offset])
        rows = await cur.fetchall()
    return json_response([obis_json(r) for r in rows])


routes: list[BaseRoute] = [
    Route("/api/meters/polling/status", polling_status, methods=["GET"]),
    Route("/api/meters/{id}/read-obis", read_obis, methods=["POST"]),
    Route("/api/meters/{id}/write-obis", write_obis, methods=["POST"]),
    Route("/api/meters/{id}/obis-readings", obis_latest, methods=["GET"]),
    Route("/api/meters/{id}/obis-readings/history", obis_history, methods=["GET"]),
]
