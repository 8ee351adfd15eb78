"""The OpenAPI 3.1 document of the REST API, served at `GET /openapi.json`.

Request bodies are the JSON Schemas of the pydantic models that validate them (the bridge's and the
API's own), so the document cannot drift from what is enforced; responses are written out here. Only
operations the running app routes are listed: the document never promises an endpoint that is not
mounted. WebSocket `/ws` and Socket.IO are described in CONTRACT.md, not here (OpenAPI has no words
for them).
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from bridge.alerts import SEVERITIES, TYPES
from bridge.telemetry import OBIS_CODE, MeterReadingIn, PumpEventIn, PumpStatusIn, VehicleReadingIn

from .alerts import RuleIn
from .eie import CorrelationIn
from .hes import MAX_CODES
from .responses import MAX_BODY, MAX_LIMIT, json_response

OPENAPI_VERSION = "3.1.0"
CONVERTER = re.compile(r"\{(\w+):\w+\}")
JSON = "application/json"
TAGS = ("health", "EMS", "EIE", "PUMP", "commands", "HES", "alerts", "dashboard", "meta")


# ---- schema building blocks ---------------------------------------------------------------------


def ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def obj(required: dict[str, Any], optional: dict[str, Any] | None = None, *, extra: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "properties": {**required, **(optional or {})}}
    if required:
        out["required"] = list(required)
    if not extra:
        out["additionalProperties"] = False
    return out


STR: dict[str, Any] = {"type": "string"}
NUM: dict[str, Any] = {"type": "number"}
INT: dict[str, Any] = {"type": "integer"}
COUNT: dict[str, Any] = {"type": "integer", "minimum": 0}
BOOL: dict[str, Any] = {"type": "boolean"}
TIME: dict[str, Any] = {"type": "string", "format": "date-time"}
NUM_OR_NULL = nullable(NUM)
TIME_OR_NULL = nullable(TIME)
STATUS = {"type": "string", "enum": ["online", "offline"]}
COMMAND_STATUS = {"type": "string", "enum": ["queued", "sent", "acked", "failed", "expired"]}
ID_RULE = "Device ids are `[A-Za-z0-9_.:-]{1,64}`."
# topics.DEVICE_ID in JSON Schema's regex dialect (ECMA-262), where $ is the very end
ID_PATTERN = "^[A-Za-z0-9_.:-]{1,64}$"


def _device_id(kind: str) -> dict[str, Any]:
    return {"type": "string", "pattern": ID_PATTERN, "description": f"A {kind} id. {ID_RULE}"}


def model_schemas() -> dict[str, Any]:
    """The request models' JSON Schemas, their nested models hoisted into components."""
    out: dict[str, Any] = {}
    models: tuple[type[BaseModel], ...] = (
        MeterReadingIn,
        VehicleReadingIn,
        PumpStatusIn,
        PumpEventIn,
        CorrelationIn,
        RuleIn,
    )
    for model in models:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        out.update(schema.pop("$defs", {}))
        out[model.__name__] = schema
    # the API's own rule on correlation ids (an AfterValidator, which JSON Schema cannot see)
    out["CorrelationIn"]["properties"]["vehicleId"] = ref("VehicleId")
    out["CorrelationIn"]["properties"]["meterId"] = ref("MeterId")
    # the rule checks (bridge.alerts.rule_problems) know the types and severities; say so here too
    rule = out["RuleIn"]["properties"]
    rule["type"] = nullable({"type": "string", "enum": sorted(TYPES)})
    rule["severity"] = nullable({"type": "string", "enum": list(SEVERITIES)})
    rule["deviceId"] = nullable(ref("DeviceId"))
    return out


def _with_id(model: str, field: str, id_schema: str, aliases: str) -> dict[str, Any]:
    return {
        "allOf": [ref(model), {"type": "object", "required": [field], "properties": {field: ref(id_schema)}}],
        "description": f"`{field}` names the device ({aliases} are accepted in its place).",
    }


ERROR = obj(
    {
        "error": obj(
            {"code": STR, "message": {"type": "string", "minLength": 1}},
            {"details": {"description": "what is wrong, field by field where it applies"}},
        )
    }
)
FIELD_ERROR = obj({"field": STR, "message": STR}, {"type": STR})
VALIDATION_ERROR = obj(
    {
        "error": obj(
            {
                "code": {"type": "string", "const": "validation_error"},
                "message": {"type": "string", "minLength": 1},
                "details": {"type": "array", "items": ref("FieldError"), "minItems": 1},
            }
        )
    }
)

METER_READING_OUT = obj(
    {
        "timestamp": TIME,
        "totalPowerKw": NUM_OR_NULL,
        "kwhConsumedAc": NUM_OR_NULL,
        "energyTotalKwh": NUM_OR_NULL,
        "voltage": NUM_OR_NULL,
        "current": NUM_OR_NULL,
        "frequency": NUM_OR_NULL,
        "powerFactor": NUM_OR_NULL,
    }
)
DB_CHECK = obj({"status": {"type": "string", "enum": ["up", "down"]}}, {"level": STR, "latencyMs": NUM, "error": STR})
BROKER_CHECK = obj({"status": {"type": "string", "enum": ["up", "down"]}, "protocol": STR})
TANK_STATS = obj({"avg_level_percent": NUM_OR_NULL, "min_level_percent": NUM_OR_NULL, "max_level_percent": NUM_OR_NULL})
OBIS_CODE_SCHEMA = {
    "type": "string",
    "pattern": OBIS_CODE.pattern,
    "description": "An OBIS code like `1-0:1.8.0.255`",
}

RESPONSE_SCHEMAS: dict[str, Any] = {
    "Error": ERROR,
    "FieldError": FIELD_ERROR,
    "ValidationError": VALIDATION_ERROR,
    "DeviceId": _device_id("device"),
    "MeterId": _device_id("meter"),
    "VehicleId": _device_id("vehicle"),
    "PumpId": _device_id("pump"),
    "ObisCode": OBIS_CODE_SCHEMA,
    "Health": obj(
        {
            "status": {"type": "string", "enum": ["ok", "degraded"]},
            "timestamp": TIME,
            "uptime": NUM,
            "database": DB_CHECK,
            "mqtt": BROKER_CHECK,
            "services": obj({"database": STR, "mqtt": STR}),
        }
    ),
    "DatabasesHealth": obj(
        {
            "status": {"type": "string", "enum": ["ok", "error"]},
            "postgres": DB_CHECK,
            "timescaledb": DB_CHECK,
            "mqtt": BROKER_CHECK,
            "timestamp": TIME,
        }
    ),
    "Accepted": obj(
        {
            "status": {"type": "string", "const": "accepted"},
            "deviceId": STR,
            "kind": {"type": "string", "enum": ["meter", "vehicle", "pump"]},
            "topic": STR,
            "timestamp": TIME,
        },
        {"type": {"type": "string", "enum": ["meter", "vehicle"]}, "success": {"type": "boolean", "const": True}},
    ),
    "Meter": obj(
        {"deviceId": STR, "status": STATUS, "lastSeen": TIME_OR_NULL, "lastReading": nullable(ref("MeterReadingOut"))}
    ),
    "MeterReadingOut": METER_READING_OUT,
    "Block": obj(
        {
            "deviceId": STR,
            "start": TIME,
            "end": TIME,
            "isPeakHour": BOOL,
            "totalKwh": NUM,
            "readingCount": COUNT,
            "avgKw": NUM_OR_NULL,
            "maxKw": NUM_OR_NULL,
        }
    ),
    "Correlation": obj({"vehicleId": STR, "meterId": STR, "createdAt": TIME}),
    "Performance": obj(
        {
            "vehicleId": STR,
            "period": {"type": "string", "const": "24h"},
            "periodStart": TIME,
            "periodEnd": TIME,
            "totalKwhConsumedAc": NUM,
            "totalKwhDeliveredDc": NUM,
            "efficiencyRatio": NUM_OR_NULL,
            "averageBatteryTemp": NUM_OR_NULL,
            "recordCount": COUNT,
            "status": {"type": "string", "enum": ["normal", "fault_suspected", "insufficient_data"]},
        }
    ),
    "PumpStatus": {
        **obj(
            {
                "device_id": STR,
                "timestamp": TIME_OR_NULL,
                "ground_tank": nullable({"type": "object"}),
                "roof_tank": nullable({"type": "object"}),
                "pump": nullable({"type": "object"}),
                "system": nullable({"type": "object"}),
                "online": BOOL,
                "last_seen": TIME_OR_NULL,
            }
        ),
        "description": "The pump's latest status document (PUMP's field names) with `online` and `last_seen`.",
    },
    "HistoryBucket": obj(
        {
            "timestamp": TIME,
            "ground_tank": TANK_STATS,
            "roof_tank": TANK_STATS,
            "pump": obj(
                {"running_ratio": NUM_OR_NULL, "avg_current_amps": NUM_OR_NULL, "max_current_amps": NUM_OR_NULL}
            ),
            "samples": COUNT,
        }
    ),
    "SystemStats": obj(
        {
            "devices": COUNT,
            "onlineDevices": COUNT,
            "messagesReceived": COUNT,
            "messagesStored": COUNT,
            "deadLetters": COUNT,
            "websocketClients": COUNT,
        }
    ),
    "CommandIn": {
        **obj(
            {"command": {"type": "string", "minLength": 1, "maxLength": 64}},
            {
                "state": {"type": "string", "enum": ["on", "off"], "description": "for `pump` (required there)"},
                "enabled": {"type": "boolean", "description": "for `auto_mode` (required there)"},
                "force": {"type": "boolean", "description": "start a pump even when it would run dry"},
            },
        ),
        "description": "Every field but `command`, `commandId` and `force` is passed on to the device.",
    },
    "CommandSent": obj(
        {
            "commandId": STR,
            "deviceId": STR,
            "command": STR,
            "status": COMMAND_STATUS,
            "result": {},
            "createdAt": TIME,
            "expiresAt": TIME_OR_NULL,
        }
    ),
    "Command": obj(
        {
            "commandId": STR,
            "deviceId": STR,
            "command": STR,
            "payload": {},
            "status": COMMAND_STATUS,
            "result": {},
            "createdAt": TIME,
            "updatedAt": TIME,
            "expiresAt": TIME_OR_NULL,
        }
    ),
    "PollingStatus": obj(
        {
            "totalMeters": COUNT,
            "onlineMeters": COUNT,
            "offlineMeters": COUNT,
            "expectedIntervalSeconds": NUM,
            "lastPollAt": TIME_OR_NULL,
            "meters": {
                "type": "array",
                "items": obj(
                    {"meterId": STR, "status": STATUS, "lastReport": TIME_OR_NULL},
                    {"lastReading": ref("MeterReadingOut")},
                ),
            },
        }
    ),
    "ReadObisIn": obj({"obisCodes": {"type": "array", "items": ref("ObisCode"), "minItems": 1, "maxItems": MAX_CODES}}),
    "WriteObisIn": obj({"obisCode": ref("ObisCode"), "value": {"type": ["number", "string", "boolean"]}}),
    "ObisReading": obj(
        {
            "obisCode": STR,
            "value": NUM,
            "rawValue": NUM,
            "scaler": INT,
            "unit": nullable(STR),
            "quality": nullable(STR),
            "timestamp": TIME,
        }
    ),
    "ReadObisResult": obj(
        {
            "meterId": STR,
            "commandId": STR,
            "status": COMMAND_STATUS,
            "readings": {"type": "array", "items": ref("ObisReading")},
        },
        {"message": STR},
    ),
    "CommandRef": obj({"meterId": STR, "commandId": STR, "status": COMMAND_STATUS}),
    "Vehicle": obj(
        {
            "deviceId": STR,
            "status": STATUS,
            "lastSeen": TIME_OR_NULL,
            "lastReading": nullable(
                obj({"timestamp": TIME, "soc": NUM_OR_NULL, "kwhDeliveredDc": NUM_OR_NULL, "batteryTemp": NUM_OR_NULL})
            ),
        }
    ),
    "AlertId": {"type": "integer", "minimum": 0},
    "RuleId": {"type": "integer", "minimum": 0},
    "Alert": obj(
        {
            "id": INT,
            "deviceId": STR,
            "kind": nullable(STR),
            "ruleId": nullable(INT),
            "type": STR,
            "severity": STR,
            "state": {"type": "string", "enum": ["active", "resolved"]},
            "active": BOOL,
            "message": nullable(STR),
            "value": NUM_OR_NULL,
            "resolvedValue": NUM_OR_NULL,
            "raisedAt": TIME,
            "resolvedAt": TIME_OR_NULL,
            "acknowledged": BOOL,
            "acknowledgedAt": TIME_OR_NULL,
            "acknowledgedBy": nullable(STR),
        }
    ),
    "AlertEvent": obj(
        {
            "id": INT,
            "alertId": INT,
            "deviceId": STR,
            "kind": nullable(STR),
            "ruleId": nullable(INT),
            "type": STR,
            "severity": STR,
            "event": {"type": "string", "enum": ["raised", "resolved", "acknowledged"]},
            "timestamp": TIME,
            "value": NUM_OR_NULL,
            "message": nullable(STR),
        }
    ),
    "AlertRule": obj(
        {
            "id": INT,
            "type": STR,
            "deviceId": nullable(STR),
            "kind": nullable(STR),
            "target": nullable(STR),
            "thresholdLow": NUM_OR_NULL,
            "thresholdHigh": NUM_OR_NULL,
            "clearLow": NUM_OR_NULL,
            "clearHigh": NUM_OR_NULL,
            "severity": STR,
            "enabled": BOOL,
            "builtin": BOOL,
            "description": nullable(STR),
            "createdAt": TIME,
            "updatedAt": TIME,
        }
    ),
    "AckIn": obj({}, {"by": {"type": "string", "maxLength": 128, "description": "who acknowledges"}}),
    "MeterIngestion": _with_id("MeterReadingIn", "meterId", "MeterId", "`deviceId`, `meter_id`, `device_id`"),
    "VehicleIngestion": _with_id("VehicleReadingIn", "vehicleId", "VehicleId", "`deviceId`, `vehicle_id`, `device_id`"),
    "PumpStatusIngestion": _with_id("PumpStatusIn", "device_id", "PumpId", "`deviceId`"),
    "PumpEventIngestion": _with_id("PumpEventIn", "device_id", "PumpId", "`deviceId`"),
    "AnyIngestion": {
        "anyOf": [ref("MeterIngestion"), ref("VehicleIngestion")],
        "properties": {"type": {"type": "string", "enum": ["meter", "vehicle"]}},
        "description": "A meter or vehicle reading: an explicit `type` decides, else the id field, else the "
        "measurements sent.",
    },
}


# ---- responses and parameters -------------------------------------------------------------------


def _error(description: str, schema: str = "Error") -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": ref(schema)}}}


RESPONSES: dict[str, Any] = {
    "BadRequest": _error("Malformed request: body not JSON, or a query parameter out of range"),
    "Unauthorized": {
        **_error("Missing or invalid bearer token"),
        "headers": {"WWW-Authenticate": {"schema": STR}},
    },
    "NotFound": _error("No such device, command or resource"),
    "Conflict": _error("Refused in the current state (details say why and how to insist)"),
    "TooLarge": _error(f"Body over {MAX_BODY} bytes"),
    "Invalid": _error(
        "The body breaks a type, a range or a rule; `details` lists every field error", "ValidationError"
    ),
    "Unavailable": _error("The database or the broker cannot be reached; retry later"),
}
TOTAL_HEADER = {"X-Total-Count": {"description": "items in all pages", "schema": COUNT}}


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


PARAMETERS: dict[str, Any] = {
    "limit": _query("limit", {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": 100}, "page size"),
    "offset": _query("offset", {"type": "integer", "minimum": 0, "default": 0}, "items to skip"),
    "from": _query("from", STR, "start (inclusive): ISO-8601 (naive means SITE_TIMEZONE) or epoch ms"),
    "to": _query("to", STR, "end (exclusive): ISO-8601 (naive means SITE_TIMEZONE) or epoch ms"),
}


def _param(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/parameters/{name}"}


def _path(name: str, schema: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": ref(schema)}


def _json(schema: dict[str, Any], description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description, "content": {JSON: {"schema": schema}}}
    if headers:
        out["headers"] = headers
    return out


def _list(item: str, description: str, total: bool = True) -> dict[str, Any]:
    return _json({"type": "array", "items": ref(item)}, description, TOTAL_HEADER if total else None)


def op(
    tag: str,
    summary: str,
    ok: dict[str, dict[str, Any]],
    *,
    errors: tuple[str, ...] = (),
    params: tuple[dict[str, Any], ...] = (),
    body: str | None = None,
    body_required: bool = True,
    public: bool = False,
) -> dict[str, Any]:
    """One operation; a JSON body brings 400 (not JSON), 413 and 422 with it, and auth brings 401."""
    codes = {"400": "BadRequest", "404": "NotFound", "409": "Conflict", "413": "TooLarge", "422": "Invalid"}
    codes |= {"503": "Unavailable"}
    wanted = set(errors) | ({"400", "413", "422"} if body else set())
    responses: dict[str, Any] = dict(ok)
    if not public:
        responses["401"] = {"$ref": "#/components/responses/Unauthorized"}
    for code in sorted(wanted):
        responses[code] = {"$ref": f"#/components/responses/{codes[code]}"}
    out: dict[str, Any] = {"tags": [tag], "summary": summary, "responses": responses}
    if params:
        out["parameters"] = list(params)
    if body:
        out["requestBody"] = {"required": body_required, "content": {JSON: {"schema": ref(body)}}}
    if public:
        out["security"] = []
    return out


PAGE = (_param("limit"), _param("offset"))
METER = _path("deviceId", "MeterId")
HES_METER = _path("id", "MeterId")
PUMP = _path("deviceId", "PumpId")
DEVICE = _path("deviceId", "DeviceId")
DB = ("503",)
ACCEPTED = _json(ref("Accepted"), "Accepted: published to the device's MQTT topic, the broker has it")


def operations() -> dict[tuple[str, str], dict[str, Any]]:
    """Every documented (path, method)."""
    health = _json(ref("Health"), "Liveness, with database and broker reachability")
    return {
        ("/api/health", "get"): op("health", "EMS health", {"200": health}, public=True),
        ("/api/v1/health", "get"): op("health", "PUMP health", {"200": health}, public=True),
        ("/api/v1/health/databases", "get"): op(
            "health",
            "Database and broker reachability",
            {
                "200": _json(ref("DatabasesHealth"), "The database answers"),
                "503": _json(ref("DatabasesHealth"), "The database does not answer"),
            },
            public=True,
        ),
        ("/openapi.json", "get"): op(
            "meta", "This document", {"200": _json({"type": "object"}, "OpenAPI 3.1")}, public=True
        ),
        # EMS
        ("/api/meters", "get"): op(
            "EMS",
            "Meters with their status and latest reading",
            {"200": _list("Meter", "Meters ordered by id")},
            params=(_query("status", STATUS, "only meters with this status"), *PAGE),
            errors=("400", *DB),
        ),
        ("/api/meters/{deviceId}/current-block", "get"): op(
            "EMS",
            "The meter's current 30-minute block",
            {"200": _json(ref("Block"), "The block holding now (zeros when it has no data yet)")},
            params=(METER,),
            errors=("404", *DB),
        ),
        ("/api/meters/{deviceId}/blocks/today", "get"): op(
            "EMS",
            "The meter's blocks since local midnight (SITE_TIMEZONE)",
            {"200": _list("Block", "Blocks with data, oldest first")},
            params=(METER, *PAGE),
            errors=("400", "404", *DB),
        ),
        # EIE
        ("/v1/ingestion/meter", "post"): op(
            "EIE", "Ingest a meter reading", {"202": ACCEPTED}, body="MeterIngestion", errors=DB
        ),
        ("/v1/ingestion/vehicle", "post"): op(
            "EIE", "Ingest a vehicle reading", {"202": ACCEPTED}, body="VehicleIngestion", errors=DB
        ),
        ("/v1/ingest", "post"): op(
            "EIE", "Ingest a meter or vehicle reading", {"202": ACCEPTED}, body="AnyIngestion", errors=DB
        ),
        ("/v1/ingestion/correlate", "post"): op(
            "EIE",
            "Correlate a vehicle with the meter that charges it",
            {
                "201": _json(ref("Correlation"), "Correlated"),
                "200": _json(ref("Correlation"), "Already correlated"),
            },
            body="CorrelationIn",
            errors=DB,
        ),
        ("/v1/analytics/performance/{vehicleId}", "get"): op(
            "EIE",
            "The vehicle's 24-hour charging efficiency (DC delivered / AC consumed)",
            {"200": _json(ref("Performance"), "Efficiency; below 0.85 is a suspected fault")},
            params=(_path("vehicleId", "VehicleId"),),
            errors=("404", *DB),
        ),
        # PUMP
        ("/api/v1/devices/status/update", "post"): op(
            "PUMP", "Ingest a pump controller's status", {"202": ACCEPTED}, body="PumpStatusIngestion", errors=DB
        ),
        ("/api/v1/devices/events/pump", "post"): op(
            "PUMP", "Ingest a pump event", {"202": ACCEPTED}, body="PumpEventIngestion", errors=DB
        ),
        ("/api/v1/devices/status", "get"): op(
            "PUMP",
            "Every pump's latest status",
            {"200": _list("PumpStatus", "Pumps ordered by id")},
            params=PAGE,
            errors=("400", *DB),
        ),
        ("/api/v1/devices/system/stats", "get"): op(
            "PUMP",
            "Counts since the database was created",
            {"200": _json(ref("SystemStats"), "Counts")},
            errors=DB,
        ),
        ("/api/v1/devices/{deviceId}/status", "get"): op(
            "PUMP",
            "One pump's latest status",
            {"200": _json(ref("PumpStatus"), "The latest status")},
            params=(PUMP,),
            errors=("404", *DB),
        ),
        ("/api/v1/devices/{deviceId}/history", "get"): op(
            "PUMP",
            "One pump's history in buckets",
            {"200": _list("HistoryBucket", "Buckets, oldest first", total=False)},
            params=(
                PUMP,
                _param("from"),
                _param("to"),
                _query("interval", {"type": "string", "default": "1h"}, "bucket width: `5m`, `15m`, `1h`, `1d`…"),
            ),
            errors=("400", "404", *DB),
        ),
        # commands
        ("/api/v1/devices/{deviceId}/commands", "post"): op(
            "commands",
            "Send a command to a device over MQTT",
            {"202": _json(ref("CommandSent"), "Stored and handed to the broker")},
            params=(DEVICE,),
            body="CommandIn",
            errors=("404", "409", *DB),
        ),
        ("/api/v1/devices/{deviceId}/commands", "get"): op(
            "commands",
            "The device's commands, newest first",
            {"200": _list("Command", "Commands", total=False)},
            params=(DEVICE, *PAGE),
            errors=("400", "404", *DB),
        ),
        ("/api/v1/devices/{deviceId}/commands/{commandId}", "get"): op(
            "commands",
            "One command and where it stands",
            {"200": _json(ref("Command"), "The command")},
            params=(DEVICE, {"name": "commandId", "in": "path", "required": True, "schema": STR}),
            errors=("404", *DB),
        ),
        # HES
        ("/api/meters/polling/status", "get"): op(
            "HES",
            "How the meters report",
            {"200": _json(ref("PollingStatus"), "Counts and each meter (paged)")},
            params=PAGE,
            errors=("400", *DB),
        ),
        ("/api/meters/{id}/read-obis", "post"): op(
            "HES",
            "Ask a meter for OBIS values (waits up to READ_OBIS_WAIT for its answer)",
            {
                "200": _json(ref("ReadObisResult"), "The meter answered (or refused, or the command expired)"),
                "202": _json(ref("CommandRef"), "Sent; no answer yet: follow the command"),
            },
            params=(HES_METER,),
            body="ReadObisIn",
            errors=("404", *DB),
        ),
        ("/api/meters/{id}/write-obis", "post"): op(
            "HES",
            "Write an OBIS value to a meter",
            {"202": _json(ref("CommandRef"), "Sent: follow the command")},
            params=(HES_METER,),
            body="WriteObisIn",
            errors=("404", *DB),
        ),
        ("/api/meters/{id}/obis-readings", "get"): op(
            "HES",
            "The newest value of each OBIS code",
            {"200": _list("ObisReading", "Readings by code", total=False)},
            params=(HES_METER,),
            errors=("404", *DB),
        ),
        ("/api/meters/{id}/obis-readings/history", "get"): op(
            "HES",
            "Stored OBIS readings, newest first",
            {"200": _list("ObisReading", "Readings", total=False)},
            params=(
                HES_METER,
                _query("obisCode", ref("ObisCode"), "only this code"),
                _param("from"),
                _param("to"),
                *PAGE,
            ),
            errors=("400", "404", *DB),
        ),
        # alerts
        **alert_operations(),
        # the dashboard's own
        ("/", "get"): {
            "tags": ["dashboard"],
            "summary": "The live dashboard page",
            "security": [],
            "responses": {"200": {"description": "HTML", "content": {"text/html": {"schema": STR}}}},
        },
        ("/api/vehicles", "get"): op(
            "dashboard",
            "Vehicles with their latest reading",
            {"200": _list("Vehicle", "Vehicles ordered by id")},
            params=PAGE,
            errors=("400", *DB),
        ),
    }


def alert_operations() -> dict[tuple[str, str], dict[str, Any]]:
    alert_id = {"name": "id", "in": "path", "required": True, "schema": ref("AlertId")}
    rule_id = {"name": "id", "in": "path", "required": True, "schema": ref("RuleId")}
    kinds = {"type": "string", "description": "comma list of meter, vehicle, pump"}
    filters = (
        _query("kind", kinds, "only these kinds"),
        _query("type", STR, "comma list of alert types"),
        _query("severity", STR, "comma list of severities"),
        _param("from"),
        _param("to"),
        *PAGE,
    )
    flags = (
        _query("active", BOOL, "only active (true) or resolved (false) alerts"),
        _query("state", {"type": "string", "enum": ["active", "resolved"]}, "the same as `active`"),
        _query("acknowledged", BOOL, "only acknowledged (true) or unacknowledged (false) alerts"),
    )
    by_device = _query("deviceId", ref("DeviceId"), "only this device's")
    alerts = _list("Alert", "Alerts, newest first")
    one_alert = _json(ref("Alert"), "The alert")
    rule = _json(ref("AlertRule"), "The rule")
    return {
        ("/api/v1/alerts", "get"): op(
            "alerts", "Alerts, newest first", {"200": alerts}, params=(by_device, *flags, *filters), errors=("400",)
        ),
        ("/api/v1/alerts/active", "get"): op(
            "alerts", "Active alerts, newest first", {"200": alerts}, params=(by_device, *filters), errors=("400",)
        ),
        ("/api/v1/devices/{deviceId}/alerts", "get"): op(
            "alerts",
            "One device's alerts, newest first",
            {"200": alerts},
            params=(DEVICE, *flags, *filters),
            errors=("400",),
        ),
        ("/api/v1/alerts/events", "get"): op(
            "alerts",
            "The alert log (raised, resolved, acknowledged), newest first",
            {"200": _list("AlertEvent", "Events")},
            params=(
                by_device,
                _query("event", STR, "comma list of raised, resolved, acknowledged"),
                _query("alertId", ref("AlertId"), "only this alert's"),
                *filters,
            ),
            errors=("400",),
        ),
        ("/api/v1/alerts/{id}", "get"): op(
            "alerts", "One alert", {"200": one_alert}, params=(alert_id,), errors=("404",)
        ),
        **{
            (path, "post"): op(
                "alerts",
                "Acknowledge an alert (again changes nothing)",
                {"200": one_alert},
                params=(alert_id,),
                body="AckIn",
                body_required=False,
                errors=("404",),
            )
            for path in ("/api/v1/alerts/{id}/ack", "/api/v1/alerts/{id}/acknowledge")
        },
        ("/api/v1/alerts/rules", "get"): op(
            "alerts",
            "Alert rules",
            {"200": _list("AlertRule", "Rules by id")},
            params=(
                by_device,
                _query("kind", kinds, "only these kinds"),
                _query("type", STR, "comma list of alert types"),
                _query("enabled", BOOL, "only enabled (true) or disabled (false) rules"),
                *PAGE,
            ),
            errors=("400",),
        ),
        ("/api/v1/alerts/rules", "post"): op(
            "alerts", "Create a rule", {"201": _json(ref("AlertRule"), "Created")}, body="RuleIn"
        ),
        ("/api/v1/alerts/rules/{id}", "get"): op(
            "alerts", "One rule", {"200": rule}, params=(rule_id,), errors=("404",)
        ),
        **{
            ("/api/v1/alerts/rules/{id}", method): op(
                "alerts",
                "Change the fields given (null clears one); a built-in rule only has its thresholds, severity, "
                "enabled and description changed",
                {"200": rule},
                params=(rule_id,),
                body="RuleIn",
                errors=("404", "409"),
            )
            for method in ("put", "patch")
        },
        ("/api/v1/alerts/rules/{id}", "delete"): op(
            "alerts",
            "Delete a rule (built-in rules cannot be: disable them)",
            {"204": {"description": "Deleted"}},
            params=(rule_id,),
            errors=("404", "409"),
        ),
    }


def served(routes: list[BaseRoute]) -> set[tuple[str, str]]:
    """(path, method) of every plain HTTP route (Mounts and WebSocket routes are not REST)."""
    out: set[tuple[str, str]] = set()
    for route in routes:
        if isinstance(route, Route):
            path = CONVERTER.sub(r"{\1}", route.path)  # `{id:int}` is `{id}` in OpenAPI
            out |= {(path, m.lower()) for m in route.methods or () if m != "HEAD"}
    return out


def document(routes: list[BaseRoute] | None = None) -> dict[str, Any]:
    """The document; with `routes`, only the operations among them."""
    wanted = served(routes) if routes is not None else None
    paths: dict[str, dict[str, Any]] = {}
    for (path, method), operation in operations().items():
        if wanted is None or (path, method) in wanted:
            paths.setdefault(path, {})[method] = operation
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "Telemetry API",
            "version": "1",
            "description": "REST endpoints of EMS, EIE, PUMP and HES on one MQTT-native backend. Errors are "
            '`{"error": {"code", "message", "details"?}}`. Live updates: WebSocket `/ws` and Socket.IO '
            "`/socket.io/` (see CONTRACT.md).",
        },
        "tags": [{"name": t} for t in TAGS],
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {**model_schemas(), **RESPONSE_SCHEMAS},
            "responses": RESPONSES,
            "parameters": PARAMETERS,
        },
    }


async def openapi(request: Request) -> Response:
    return json_response(document(request.app.routes))


routes: list[BaseRoute] = [Route("/openapi.json", openapi, methods=["GET"])]
