"""Endpoints of EMS (see ../shared/CONTRACT.md): meters, the current 30-minute block and today's blocks.

Block figures come from the `meter_blocks_30m` view, and the current block from the energy pieces the
view sums (see `_BLOCK_AT`); raw readings are never scanned here.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, time
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import PoolTimeout
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from bridge.energy import BLOCK, block_start

from .config import ApiSettings
from .errors import ApiError, NotFound, Unavailable
from .responses import iso, json_response, paging

STATUSES = ("online", "offline")

_METER_PAGE = """
    SELECT d.device_id, d.status, d.last_seen,
           l.ts, l.power_kw, l.energy_total_kwh, l.kwh_consumed_ac,
           l.voltage, l.current, l.frequency, l.power_factor
    FROM devices d LEFT JOIN meter_latest l ON l.meter_id = d.device_id
    WHERE d.kind = 'meter' AND (%(status)s::text IS NULL OR d.status = %(status)s)
    ORDER BY d.device_id
    LIMIT %(limit)s OFFSET %(offset)s
"""
_METER_COUNT = """
    SELECT count(*) FROM devices d
    WHERE d.kind = 'meter' AND (%(status)s::text IS NULL OR d.status = %(status)s)
"""
# The current block straight from `meter_energy`, with bounds PostgreSQL can use: a piece's `ts` is
# its block's start (so `ts = start` is the view's `bucket = start`), and no piece of a block comes
# from a reading older than the block before it (a power reading's hold is at most 5 minutes; spread
# register/interval energy comes from the reading at the spread's end). The Apache/plain views group by
# a time_bucket()/date_bin() expression, and a filter on it scanned every chunk of the meter's
# history. Same figures and rounding as `meter_blocks_30m`, on every schema level.
_BLOCK_AT = """
    SELECT %(start)s::timestamptz AS block_start, %(start)s::timestamptz + INTERVAL '30 minutes' AS block_end,
           round(sum(e.kwh)::numeric, 6)::float8 AS total_kwh,
           count(*) FILTER (WHERE e.is_reading) AS reading_count,
           round(avg(e.power_kw)::numeric, 6)::float8 AS avg_kw,
           round(max(e.power_kw)::numeric, 6)::float8 AS max_kw,
           CASE WHEN min(s.peak_start) <= min(s.peak_end)
                THEN (%(start)s::timestamptz AT TIME ZONE min(s.timezone))::time >= min(s.peak_start)
                     AND (%(start)s::timestamptz AT TIME ZONE min(s.timezone))::time < min(s.peak_end)
                ELSE (%(start)s::timestamptz AT TIME ZONE min(s.timezone))::time >= min(s.peak_start)
                     OR (%(start)s::timestamptz AT TIME ZONE min(s.timezone))::time < min(s.peak_end)
           END AS is_peak
    FROM meter_energy e CROSS JOIN site_settings s
    WHERE e.meter_id = %(id)s AND e.ts = %(start)s
      AND e.source_ts >= %(start)s::timestamptz - INTERVAL '30 minutes'
    HAVING count(*) > 0
"""
# A power reading leaves a 0 kWh piece in the following block; that block has no data of its own.
_BLOCKS_BETWEEN = """
    SELECT block_start, block_end, total_kwh, reading_count, avg_kw, max_kw, is_peak
    FROM meter_blocks_30m
    WHERE meter_id = %s AND block_start >= %s AND block_start <= %s AND (reading_count > 0 OR total_kwh <> 0)
    ORDER BY block_start
"""


@contextlib.asynccontextmanager
async def connection(request: Request) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """A pooled connection; a database that cannot be reached is a 503, not a 500."""
    try:
        async with request.state.services.pool.connection() as conn:
            yield conn
    except (PoolTimeout, psycopg.OperationalError) as exc:
        raise Unavailable(f"database unavailable: {exc}") from exc


def block_dict(meter_id: str, row: dict[str, Any]) -> dict[str, Any]:
    return {
        "deviceId": meter_id,
        "start": iso(row["block_start"]),
        "end": iso(row["block_end"]),
        "isPeakHour": bool(row["is_peak"]),
        "totalKwh": float(row["total_kwh"] or 0.0),
        "readingCount": int(row["reading_count"] or 0),
        "avgKw": row["avg_kw"],
        "maxKw": row["max_kw"],
    }


def empty_block(settings: ApiSettings, meter_id: str, start: datetime) -> dict[str, Any]:
    """A block with no data yet: zeros, and the peak flag from the configured window."""
    local = start.astimezone(settings.core.site_timezone).time()
    row = {
        "block_start": start,
        "block_end": start + BLOCK,
        "is_peak": settings.core.peak_window.contains(local),
        "total_kwh": 0.0,
        "reading_count": 0,
        "avg_kw": None,
        "max_kw": None,
    }
    return block_dict(meter_id, row)


async def meter_exists(conn: psycopg.AsyncConnection[Any], meter_id: str) -> bool:
    cur = await conn.execute("SELECT 1 FROM devices WHERE device_id = %s AND kind = 'meter'", (meter_id,))
    return await cur.fetchone() is not None


async def current_block(
    conn: psycopg.AsyncConnection[Any], settings: ApiSettings, meter_id: str, now: datetime | None = None
) -> dict[str, Any]:
    """The block holding `now` (EMS `currentBlock`); usable by the live hub as well."""
    start = block_start(now or datetime.now(UTC))
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(_BLOCK_AT, {"id": meter_id, "start": start})
    row = await cur.fetchone()
    return block_dict(meter_id, row) if row else empty_block(settings, meter_id, start)


def local_midnight(now: datetime, settings: ApiSettings) -> datetime:
    tz = settings.core.site_timezone
    return datetime.combine(now.astimezone(tz).date(), time(0), tzinfo=tz)


async def list_meters(request: Request) -> Response:
    limit, offset = paging(request)
    status = request.query_params.get("status") or None
    if status is not None and status not in STATUSES:
        raise ApiError(400, f"status must be one of {', '.join(STATUSES)}, got {status!r}")
    params = {"status": status, "limit": limit, "offset": offset}
    async with connection(request) as conn:
        cur = conn.cursor(row_factory=dict_row)
        await cur.execute(_METER_PAGE, params)
        rows = await cur.fetchall()
        total = (await (await conn.execute(_METER_COUNT, params)).fetchone() or (0,))[0]
    return json_response([_meter(r) for r in rows], headers={"X-Total-Count": str(total)})


def _meter(r: dict[str, Any]) -> dict[str, Any]:
    reading = None
    if r["ts"] is not None:
        reading = {
            "timestamp": iso(r["ts"]),
            "totalPowerKw": r["power_kw"],
            "energyTotalKwh": r["energy_total_kwh"],
            "kwhConsumedAc": r["kwh_consumed_ac"],
            "voltage": r["voltage"],
            "current": r["current"],
            "frequency": r["frequency"],
            "powerFactor": r["power_factor"],
        }
    return {"deviceId": r["device_id"], "status": r["status"], "lastSeen": iso(r["last_seen"]), "lastReading": reading}


async def get_current_block(request: Request) -> Response:
    meter_id = request.path_params["deviceId"]
    settings: ApiSettings = request.state.services.settings
    async with connection(request) as conn:
        if not await meter_exists(conn, meter_id):
            raise NotFound(f"meter {meter_id!r} not found")
        block = await current_block(conn, settings, meter_id)
    return json_response(block)


async def blocks_today(request: Request) -> Response:
    meter_id = request.path_params["deviceId"]
    limit, offset = paging(request)
    settings: ApiSettings = request.state.services.settings
    now = datetime.now(UTC)
    async with connection(request) as conn:
        if not await meter_exists(conn, meter_id):
            raise NotFound(f"meter {meter_id!r} not found")
        cur = conn.cursor(row_factory=dict_row)
        await cur.execute(_BLOCKS_BETWEEN, (meter_id, local_midnight(now, settings), now))
        rows = await cur.fetchall()
    # at most 50 blocks a day: page in Python and the total comes free
    blocks = [block_dict(meter_id, r) for r in rows]
    return json_response(blocks[offset : offset + limit], headers={"X-Total-Count": str(len(blocks))})


routes: list[BaseRoute] = [
    Route("/api/meters", list_meters, methods=["GET"]),
    Route("/api/meters/{deviceId}/current-block", get_current_block, methods=["GET"]),
    Route("/api/meters/{deviceId}/blocks/today", blocks_today, methods=["GET"]),
]
