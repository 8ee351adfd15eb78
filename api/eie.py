"""Endpoints of EIE (see ../shared/CONTRACT.md): HTTP ingestion, meter-vehicle correlation, 24-hour efficiency.

Ingestion only validates and publishes to MQTT (the bridge stays the one writer); efficiency comes from
the hourly aggregates, summed as the `vehicle_efficiency_24h` view sums them.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from psycopg.rows import dict_row
from pydantic import AfterValidator, AliasChoices, BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from bridge import topics
from bridge.errors import PayloadError
from bridge.telemetry import MeterReadingIn, VehicleReadingIn, explain, to_datetime

from . import ingest
from .config import ApiSettings
from .ems import connection
from .errors import Invalid, NotFound
from .responses import iso, json_response, read_json, validate

# CONTRACT: below this DC/AC ratio a vehicle's charging is a suspected fault.
FAULT_BELOW = 0.85
ID_RULE = "must match [A-Za-z0-9_.:-]{1,64}"


def _measurements(model: type[BaseModel], id_field: str) -> frozenset[str]:
    """Every body key (aliases included) that carries a measurement of `model`."""
    names: set[str] = set()
    for name, info in model.model_fields.items():
        if name in (id_field, "timestamp"):
            continue
        alias = info.validation_alias
        names |= {c for c in alias.choices if isinstance(c, str)} if isinstance(alias, AliasChoices) else {name}
    return frozenset(names)


METER_FIELDS = _measurements(MeterReadingIn, "meterId")
VEHICLE_FIELDS = _measurements(VehicleReadingIn, "vehicleId")
METER_IDS = ("meterId", "meter_id")
VEHICLE_IDS = ("vehicleId", "vehicle_id")


def check_reading(settings: ApiSettings, kind: topics.Kind, body: Any) -> None:
    """Every field error at once (ingest.publish stops at the first missing id or bad timestamp)."""
    if not isinstance(body, dict):
        raise Invalid("body must be a JSON object", details=[{"field": "(body)", "message": "not an object"}])
    model, id_fields = ingest.MODELS[(kind, "reading")]
    errors: list[dict[str, object]] = []
    given = [body[f] for f in id_fields if f in body]
    if not given:
        errors.append({"field": id_fields[0], "message": "Field required", "type": "missing"})
    elif isinstance(given[0], str) and not topics.DEVICE_ID.match(given[0]):
        errors.append({"field": id_fields[0], "message": ID_RULE, "type": "string_pattern_mismatch"})
    try:
        parsed = model.model_validate(body)
    except ValidationError as exc:
        errors.extend(explain(exc))
    else:
        try:
            to_datetime(
                getattr(parsed, "timestamp", None),
                tz=settings.core.site_timezone,
                received_at=datetime.now(UTC),
                max_future=settings.core.max_future_skew,
            )
        except PayloadError as exc:
            errors.append({"field": "timestamp", "message": exc.reason, "type": "timestamp"})
    if errors:
        raise Invalid("invalid body", details=errors)


async def _ingest(request: Request, kind: topics.Kind, body: Any) -> dict[str, Any]:
    services = request.state.services
    check_reading(services.settings, kind, body)
    return await ingest.publish(services.settings, services.mqtt, kind, "reading", body)


async def ingest_meter(request: Request) -> Response:
    return json_response(await _ingest(request, "meter", await read_json(request)), 202)


async def ingest_vehicle(request: Request) -> Response:
    return json_response(await _ingest(request, "vehicle", await read_json(request)), 202)


def kind_of(body: Any) -> topics.Kind:
    """Meter or vehicle: an explicit `type` wins, then the id field named, then the measurements sent."""
    if not isinstance(body, dict):
        raise Invalid("body must be a JSON object", details=[{"field": "(body)", "message": "not an object"}])
    if "type" in body:
        declared = body["type"]
        if isinstance(declared, str) and declared.lower() in ("meter", "vehicle"):
            return "meter" if declared.lower() == "meter" else "vehicle"
        raise Invalid(
            f"type must be 'meter' or 'vehicle', got {declared!r}",
            details=[{"field": "type", "message": "must be 'meter' or 'vehicle'"}],
        )
    meter_id = any(k in body for k in METER_IDS)
    vehicle_id = any(k in body for k in VEHICLE_IDS)
    if meter_id != vehicle_id:
        return "meter" if meter_id else "vehicle"
    if not meter_id:
        # no kind-specific id (perhaps `deviceId`): the measurements decide
        meter = any(k in body for k in METER_FIELDS)
        vehicle = any(k in body for k in VEHICLE_FIELDS)
        if meter != vehicle:
            return "meter" if meter else "vehicle"
    raise Invalid(
        "cannot tell a meter reading from a vehicle reading",
        details=[
            {
                "field": "type",
                "message": "send meterId or vehicleId, their measurements, or type 'meter' | 'vehicle'",
            }
        ],
    )


async def ingest_any(request: Request) -> Response:
    body = await read_json(request)
    kind = kind_of(body)
    accepted = await _ingest(request, kind, body)
    return json_response({**accepted, "type": kind}, 202)


def _device_id(value: str) -> str:
    if not topics.DEVICE_ID.match(value):
        raise ValueError(ID_RULE)
    return value


DeviceId = Annotated[str, AfterValidator(_device_id)]


class CorrelationIn(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)
    vehicleId: DeviceId = Field(validation_alias=AliasChoices("vehicleId", "vehicle_id"))
    meterId: DeviceId = Field(validation_alias=AliasChoices("meterId", "meter_id"))


async def correlate(request: Request) -> Response:
    pair = validate(CorrelationIn, await read_json(request))
    ids = (pair.vehicleId, pair.meterId)
    async with connection(request) as conn:
        cur = await conn.execute(
            "INSERT INTO meter_vehicle_correlations (vehicle_id, meter_id) VALUES (%s, %s) "
            "ON CONFLICT (vehicle_id, meter_id) DO NOTHING RETURNING created_at",
            ids,
        )
        row = await cur.fetchone()
        status = 201
        if row is None:
            status = 200
            cur = await conn.execute(
                "SELECT created_at FROM meter_vehicle_correlations WHERE vehicle_id = %s AND meter_id = %s", ids
            )
            row = await cur.fetchone()
    assert row is not None  # correlations are never deleted
    return json_response({"vehicleId": pair.vehicleId, "meterId": pair.meterId, "createdAt": iso(row[0])}, status)


# The figures of `vehicle_efficiency_24h` (the current hour and the 23 before it) for one vehicle (a
# filter on the view would not reach inside its FULL JOIN): the hourly rollups (bridge/rollups.py) of the
# hours before `raw_from` (at most `done_until`, see RollupMark), the raw rows from there on, in one
# statement so both come from one snapshot. `since` is on the hour, so "hourly bucket >= since" is
# "ts >= since"; no energy piece of a block comes from a reading older than the block before it (see
# api.ems._BLOCK_AT). Summing every raw row of the day was ~1.5 ms of PostgreSQL per request at one
# reading a minute.
_PERFORMANCE = """
    WITH dc_parts AS (
        SELECT h.kwh_dc, h.temp_sum, h.temp_count, h.readings FROM vehicle_hours h
        WHERE h.vehicle_id = %(id)s AND h.hour >= %(since)s AND h.hour < %(raw_from)s
        UNION ALL
        SELECT sum(r.kwh_delivered_dc), sum(r.battery_temp), count(r.battery_temp), count(*)
        FROM vehicle_readings r WHERE r.vehicle_id = %(id)s AND r.ts >= %(raw_from)s),
    dc AS (SELECT sum(kwh_dc) AS kwh_dc, sum(temp_sum) / nullif(sum(temp_count), 0) AS avg_battery_temp,
                  sum(readings) AS record_count FROM dc_parts),
    ac_parts AS (
        SELECT h.kwh FROM meter_vehicle_correlations c JOIN meter_hours h ON h.meter_id = c.meter_id
        WHERE c.vehicle_id = %(id)s AND h.hour >= %(since)s AND h.hour < %(raw_from)s AND h.pieces > 0
        UNION ALL
        SELECT e.kwh FROM meter_vehicle_correlations c JOIN meter_energy e ON e.meter_id = c.meter_id
        WHERE c.vehicle_id = %(id)s AND e.ts >= %(raw_from)s
          AND e.source_ts >= %(raw_from)s::timestamptz - INTERVAL '30 minutes'),
    ac AS (SELECT sum(kwh) AS kwh_ac FROM ac_parts)
    SELECT %(since)s::timestamptz AS period_start, now() AS period_end,
           CASE WHEN dc.record_count > 0 OR ac.kwh_ac IS NOT NULL THEN %(id)s END AS vehicle_id,
           round(coalesce(ac.kwh_ac, 0)::numeric, 6)::float8 AS kwh_ac,
           round(coalesce(dc.kwh_dc, 0)::numeric, 6)::float8 AS kwh_dc,
           CASE WHEN ac.kwh_ac > 0 AND dc.record_count > 0
                THEN round((coalesce(dc.kwh_dc, 0) / ac.kwh_ac)::numeric, 6)::float8 END
               AS efficiency_ratio,
           dc.avg_battery_temp, dc.record_count,
           EXISTS (SELECT 1 FROM devices WHERE device_id = %(id)s AND kind = 'vehicle')
           OR EXISTS (SELECT 1 FROM meter_vehicle_correlations WHERE vehicle_id = %(id)s) AS known,
           (SELECT done_until FROM rollup_state) AS done_until
    FROM dc, ac
"""


class RollupMark:
    """Where this process last saw the hourly rollups end (`rollup_state.done_until`), learnt from each answer.

    A parameter, not a subquery, so TimescaleDB drops the chunks before it when the query starts instead
    of opening every chunk's indexes. It only ever moves forward, so a value seen earlier is at most
    behind: the hours in between are read raw, which is slower, never wrong.
    """

    def __init__(self) -> None:
        self.done_until: datetime | None = None

    def raw_from(self, since: datetime) -> datetime:
        return since if self.done_until is None else max(since, self.done_until)

    def saw(self, done_until: datetime | None) -> None:
        if done_until is not None and (self.done_until is None or done_until > self.done_until):
            self.done_until = done_until


def health_of(ratio: float | None) -> str:
    if ratio is None:
        return "insufficient_data"
    return "fault_suspected" if ratio < FAULT_BELOW else "normal"


async def performance(request: Request) -> Response:
    vehicle_id = request.path_params["vehicleId"]
    async with connection(request) as conn:
        cur = conn.cursor(row_factory=dict_row)
        # a constant, not now() in SQL: TimescaleDB then skips the chunks before it
        now = datetime.now(UTC)
        since = now.replace(minute=0, second=0, microsecond=0) - timedelta(hours=23)
        mark: RollupMark = request.state.services.rollups
        await cur.execute(_PERFORMANCE, {"id": vehicle_id, "since": since, "raw_from": mark.raw_from(since)})
        r = await cur.fetchone()
    assert r is not None  # one row always: the left join keeps it
    mark.saw(r["done_until"])
    if r["vehicle_id"] is None and not r["known"]:
        raise NotFound(f"vehicle {vehicle_id!r} not found")
    ratio = r["efficiency_ratio"]
    return json_response(
        {
            "vehicleId": vehicle_id,
            "period": "24h",
            "periodStart": iso(r["period_start"]),
            "periodEnd": iso(r["period_end"]),
            "totalKwhConsumedAc": float(r["kwh_ac"] or 0.0),
            "totalKwhDeliveredDc": float(r["kwh_dc"] or 0.0),
            "efficiencyRatio": ratio,
            "averageBatteryTemp": None if r["avg_battery_temp"] is None else float(r["avg_battery_temp"]),
            "recordCount": int(r["record_count"] or 0),
            "status": health_of(ratio),
        }
    )


routes: list[BaseRoute] = [
    Route("/v1/ingestion/meter", ingest_meter, methods=["POST"]),
    Route("/v1/ingestion/vehicle", ingest_vehicle, methods=["POST"]),
    Route("/v1/ingest", ingest_any, methods=["POST"]),
    Route("/v1/ingestion/correlate", correlate, methods=["POST"]),
    Route("/v1/analytics/performance/{vehicleId}", performance, methods=["GET"]),
]
