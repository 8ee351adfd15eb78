"""The live dashboard: a static page at `/` with its assets under `/static/`, and the vehicle list it needs.

The page is plain HTML and JavaScript shipped inside the `api` package (no build step, nothing fetched
from elsewhere at run time). It is public; the data it shows comes from the authenticated REST and
WebSocket endpoints, with the token the user gives it (or `?token=` in the address).

`GET /api/vehicles` is ours, not one of the replaced systems': none of them listed vehicles, and the
dashboard has to know which ones to ask `/v1/analytics/performance/:vehicleId` about.
"""

from __future__ import annotations

import functools
import html
import re
from importlib import resources

from psycopg.rows import dict_row
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from .ems import connection
from .responses import iso, json_response, paging

STATIC_PACKAGE = ("api", "static")
HOST = re.compile(r"^[A-Za-z0-9.:\[\]-]{1,255}$")
# The page only talks to its own origin; device-provided text is only ever set as text, never as markup.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'{sockets}; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
PAGE_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}

_VEHICLES = """
    SELECT d.device_id, d.status, d.last_seen, l.ts, l.soc, l.kwh_delivered_dc, l.battery_temp,
           count(*) OVER () AS total
    FROM devices d LEFT JOIN vehicle_latest l ON l.vehicle_id = d.device_id
    WHERE d.kind = 'vehicle'
    ORDER BY d.device_id
    LIMIT %s OFFSET %s
"""


@functools.cache
def _template() -> str:
    return (resources.files(STATIC_PACKAGE[0]) / STATIC_PACKAGE[1] / "index.html").read_text("utf-8")


async def index(request: Request) -> Response:
    """The page, told the site's zone and peak window so it can label blocks in local time."""
    core = request.state.services.settings.core
    page = (
        _template()
        .replace("{{SITE_TIMEZONE}}", html.escape(core.site_timezone.key))
        .replace("{{PEAK_WINDOW}}", html.escape(str(core.peak_window)))
    )
    # 'self' covers the page's own ws:// in current browsers; older ones need the WebSocket origin spelled out
    host = request.headers.get("host", "")
    sockets = f" ws://{host} wss://{host}" if HOST.match(host) else ""
    return HTMLResponse(page, headers={**PAGE_HEADERS, "Content-Security-Policy": CSP.format(sockets=sockets)})


async def list_vehicles(request: Request) -> Response:
    """Vehicles with their latest reading, shaped like `/api/meters`."""
    limit, offset = paging(request)
    async with connection(request) as conn, conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(_VEHICLES, (limit, offset))
        rows = await cur.fetchall()
    out = [
        {
            "deviceId": r["device_id"],
            "status": r["status"],
            "lastSeen": iso(r["last_seen"]),
            "lastReading": None
            if r["ts"] is None
            else {
                "timestamp": iso(r["ts"]),
                "soc": r["soc"],
                "kwhDeliveredDc": r["kwh_delivered_dc"],
                "batteryTemp": r["battery_temp"],
            },
        }
        for r in rows
    ]
    headers = {"X-Total-Count": str(rows[0]["total"])} if rows else None
    return json_response(out, headers=headers)


routes: list[BaseRoute] = [
    Route("/", index, methods=["GET"]),
    Route("/api/vehicles", list_vehicles, methods=["GET"]),
    Mount("/static", StaticFiles(packages=[STATIC_PACKAGE]), name="static"),
]
