"""Endpoints of PUMP, the ESP32 water-pump backend (see ../shared/CONTRACT.md).

Status documents keep PUMP's own snake_case field names (`device_id`, `ground_tank`, …); what we add
to them (`online`, `last_seen`) follows that style. History buckets of an hour or more come from the
`pump_stats_1h` aggregate; finer buckets are binned from the device's raw status rows.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

from psycopg.rows import dict_row
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from bridge.schema import COUNTER_TOTAL

from . import ingest
from .errors import ApiError, NotFound
from .responses import iso, json_response, paging, query_time, read_json

HOUR = timedelta(hours=1)
DEFAULT_SPAN = timedelta(hours=24)
DEFAULT_INTERVAL = "1h"
MAX_BUCKETS = 5000
INTERVAL = re.compile(r"^(\d{1,5})\s*(m|min|h|d)$")
UNITS = {"m": timedelta(minutes=1), "min": timedelta(minutes=1), "h": HOUR, "d": timedelta(days=1)}
EMPTY_DOC = ("timestamp", "ground_tank", "roof_tank", "pump", "system")


# ---- query parameters ---------------------------------------------------------------------------


def query_range(request: Request, span: timedelta = DEFAULT_SPAN) -> tuple[datetime, datetime]:
    """`from`/`to`, by default the `span` before now; 400 unless from < to."""
    now = datetime.now(UTC)
    end = query_time(request, "to", now)
    assert end is not None
    try:
        default_start = end - span
    except OverflowError as exc:  # `to` within a day of year 1
        raise ApiError(400, f"to: {end.isoformat()} is out of range") from exc
    start = query_time(request, "from", default_start)
    assert start is not None
    if start >= end:
        raise ApiError(400, "`from` must be before `to`")
    return start, end


def parse_interval(raw: str) -> tuple[timedelta, str]:
    """`5m`, `15m`, `1h`, `1d`… as a timedelta and its unit; 400 otherwise."""
    m = INTERVAL.match(raw.strip())
    if not m or int(m.group(1)) == 0:
        raise ApiError(400, f"interval: expected e.g. 5m, 15m, 1h or 1d, got {raw!r}")
    unit = "m" if m.group(2) == "min" else m.group(2)
    return int(m.group(1)) * UNITS[unit], unit


# ---- reads ----------------------------------------------------------------------------------------


def status_json(row: dict[str, Any]) -> dict[str, Any]:
    doc = row["doc"] or {"device_id": row["device_id"], **dict.fromkeys(EMPTY_DOC)}
    return {**doc, "online": row["status"] == "online", "last_seen": iso(row["last_seen"])}


_STATUS = """
SELECT d.device_id, d.status, d.last_seen, l.status AS doc, count(*) OVER () AS total
FROM devices d LEFT JOIN pump_latest l ON l.device_id = d.device_id
WHERE d.kind = 'pump'
"""


async def list_status(request: Request) -> Response:
    """Every pump's latest status document."""
    limit, offset = paging(request)
    async with request.state.services.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(_STATUS + " ORDER BY d.device_id LIMIT %s OFFSET %s", (limit, offset))
        rows = await cur.fetchall()
    headers = {"X-Total-Count": str(rows[0]["total"])} if rows else None
    return json_response([status_json(r) for r in rows], headers=headers)


async def device_status(request: Request) -> Response:
    device_id = request.path_params["deviceId"]
    async with request.state.services.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(_STATUS + " AND d.device_id = %s", (device_id,))
        row = await cur.fetchone()
    if row is None:
        raise NotFound(f"unknown pump {device_id!r}")
    return json_response(status_json(row))


# Hourly aggregates merged into coarser buckets: averages weighted by their sample counts.
_FROM_HOURLY = """
SELECT {bucket} AS b,
       sum(avg_ground_level * samples) / nullif(sum(samples) FILTER (WHERE avg_ground_level IS NOT NULL), 0),
       min(min_ground_level), max(max_ground_level),
       sum(avg_roof_level * samples) / nullif(sum(samples) FILTER (WHERE avg_roof_level IS NOT NULL), 0),
       min(min_roof_level), max(max_roof_level),
       sum(running_samples)::float8 / nullif(sum(samples), 0),
       sum(avg_current_amps * samples) / nullif(sum(samples) FILTER (WHERE avg_current_amps IS NOT NULL), 0),
       max(max_current_amps),
       sum(samples)::bigint
FROM pump_stats_1h
WHERE device_id = %(device)s AND bucket > %(start)s::timestamptz - INTERVAL '1 hour' AND bucket < %(end)s
GROUP BY 1 ORDER BY 1
"""
_FROM_RAW = """
SELECT {bucket} AS b,
       avg(ground_level_percent), min(ground_level_percent), max(ground_level_percent),
       avg(roof_level_percent), min(roof_level_percent), max(roof_level_percent),
       avg(pump_running::int)::float8,
       avg(pump_current_amps), max(pump_current_amps),
       count(*)
FROM pump_status
WHERE device_id = %(device)s AND ts >= %(start)s AND ts < %(end)s
GROUP BY 1 ORDER BY 1
"""
_ABSOLUTE = "date_bin(%(step)s::interval, {col}, TIMESTAMPTZ '2000-01-01 00:00:00+00')"
# Days follow the site's calendar, so a day bucket starts at local midnight whatever DST does.
_LOCAL = "(date_bin(%(step)s::interval, {col} AT TIME ZONE %(tz)s, TIMESTAMP '2000-01-01') AT TIME ZONE %(tz)s)"


def _num(value: Any, digits: int = 3) -> float | None:
    return None if value is None else round(float(value), digits)


def bucket_json(row: tuple[Any, ...]) -> dict[str, Any]:
    b, g_avg, g_min, g_max, r_avg, r_min, r_max, running, amps_avg, amps_max, samples = row
    return {
        "timestamp": iso(b),
        "ground_tank": {
            "avg_level_percent": _num(g_avg),
            "min_level_percent": _num(g_min),
            "max_level_percent": _num(g_max),
        },
        "roof_tank": {
            "avg_level_percent": _num(r_avg),
            "min_level_percent": _num(r_min),
            "max_level_percent": _num(r_max),
        },
        "pump": {
            "running_ratio": _num(running, 4),
            "avg_current_amps": _num(amps_avg),
            "max_current_amps": _num(amps_max),
        },
        "samples": int(samples),
    }


async def history(request: Request) -> Response:
    """Buckets of `interval` over `from`…`to` (default: the last 24 hours by the hour)."""
    device_id = request.path_params["deviceId"]
    services = request.state.services
    start, end = query_range(request)
    step, unit = parse_interval(request.query_params.get("interval") or DEFAULT_INTERVAL)
    if (end - start) / step > MAX_BUCKETS:
        raise ApiError(400, f"at most {MAX_BUCKETS} buckets per request: widen the interval or narrow the range")
    hourly = step >= HOUR and step % HOUR == timedelta(0)
    template, col = (_FROM_HOURLY, "bucket") if hourly else (_FROM_RAW, "ts")
    bucket = (_LOCAL if unit == "d" else _ABSOLUTE).format(col=col)
    params = {
        "device": device_id,
        "start": start,
        "end": end,
        "step": step,
        "tz": services.settings.core.site_timezone.key,
    }
    async with services.pool.connection() as conn:
        cur = await conn.execute("SELECT 1 FROM devices WHERE device_id = %s AND kind = 'pump'", (device_id,))
        if await cur.fetchone() is None:
            raise NotFound(f"unknown pump {device_id!r}")
        cur = await conn.execute(template.format(bucket=bucket), params)
        rows = await cur.fetchall()
    return json_response([bucket_json(r) for r in rows])


async def system_stats(request: Request) -> Response:
    """Counts since the database was created, and the live clients connected right now."""
    services = request.state.services
    async with services.pool.connection() as conn:
        cur = await conn.execute(
            f"""
            SELECT (SELECT count(*) FROM devices),
                   (SELECT count(*) FROM devices WHERE status = 'online'),
                   ({COUNTER_TOTAL}), ({COUNTER_TOTAL}), ({COUNTER_TOTAL})
            """,  # noqa: S608
            ("messages_received", "messages_stored", "dead_letters"),
        )
        row = await cur.fetchone()
    assert row is not None
    devices, online, received, stored, dead = row
    return json_response(
        {
            "devices": devices,
            "onlineDevices": online,
            "messagesReceived": received,
            "messagesStored": stored,
            "deadLetters": dead,
            "websocketClients": services.hub.count,
        }
    )


# ---- ingestion ----------------------------------------------------------------------------------


async def _ingest(request: Request, channel: str) -> Response:
    services = request.state.services
    body = await read_json(request)
    accepted = await ingest.publish(services.settings, services.mqtt, "pump", channel, body)
    return json_response({"success": True, **accepted}, 202)


async def status_update(request: Request) -> Response:
    return await _ingest(request, "status")


async def pump_event(request: Request) -> Response:
    return await _ingest(request, "event")


routes: list[BaseRoute] = [
    Route("/api/v1/devices/status/update", status_update, methods=["POST"]),
    Route("/api/v1/devices/events/pump", pump_event, methods=["POST"]),
    Route("/api/v1/devices/status", list_status, methods=["GET"]),
    Route("/api/v1/devices/system/stats", system_stats, methods=["GET"]),
    Route("/api/v1/devices/{deviceId}/status", device_status, methods=["GET"]),
    Route("/api/v1/devices/{deviceId}/history", history, methods=["GET"]),
]
