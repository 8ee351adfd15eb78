"""Alerts over REST: rules, the alerts themselves, their event log, acknowledgement.

The bridge raises and resolves alerts (bridge/alerts.py); the API reads them, edits rules (the bridge
reloads them on the `NOTIFY alert_rules` sent with each change) and records acknowledgements.

- `GET /api/v1/alerts`: alerts, newest first. Filters: `deviceId`, `kind`, `type`, `severity` (comma
  lists), `active` (true/false) or `state` (active/resolved), `acknowledged`, `from`/`to` (on `raisedAt`),
  `limit`/`offset`; header `X-Total-Count`.
- `GET /api/v1/alerts/active`, `GET /api/v1/devices/{deviceId}/alerts`: the same, narrowed.
- `GET /api/v1/alerts/{id}`; `POST /api/v1/alerts/{id}/ack` (or `/acknowledge`), body optional
  `{"by": "<who>"}`, idempotent.
- `GET /api/v1/alerts/events`: the log (`raised`, `resolved`, `acknowledged`), newest first; the filters
  above plus `event` and `alertId` (`from`/`to` on the event's time).
- `GET`/`POST /api/v1/alerts/rules` (filters `deviceId`, `kind`, `type`, `enabled`; create answers 201);
  `GET`/`PUT`/`PATCH`/`DELETE /api/v1/alerts/rules/{id}`: PUT and PATCH change the fields given (null
  clears one); built-in rules can be tuned and disabled, not deleted (409).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import orjson
from psycopg.rows import dict_row
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from bridge import alerts as engine
from bridge import topics
from bridge.telemetry import explain

from .errors import ApiError, Conflict, Invalid, NotFound
from .responses import iso, json_response, paging, query_time, read_json

Finite = Annotated[float, Field(allow_inf_nan=False, ge=-1e9, le=1e9)]

RULE_COLUMNS = (
    "id, type, device_id, kind, target, threshold_low, threshold_high, clear_low, clear_high, severity, enabled, "
    "builtin, description, created_at, updated_at"
)
ALERT_COLUMNS = (
    "id, device_id, kind, rule_id, type, severity, state, value, resolved_value, message, raised_at, resolved_at, "
    "acknowledged_at, acknowledged_by"
)
EVENT_COLUMNS = "id, alert_id, device_id, kind, rule_id, type, severity, event, ts, value, message"
# API field -> column of alert_rules
RULE_FIELDS = {
    "type": "type",
    "deviceId": "device_id",
    "kind": "kind",
    "target": "target",
    "thresholdLow": "threshold_low",
    "thresholdHigh": "threshold_high",
    "clearLow": "clear_low",
    "clearHigh": "clear_high",
    "severity": "severity",
    "enabled": "enabled",
    "description": "description",
}
# what a built-in rule lets you change: its thresholds, severity, whether it runs, its description
TUNABLE = frozenset({"thresholdLow", "thresholdHigh", "clearLow", "clearHigh", "severity", "enabled", "description"})
KINDS = ("meter", "vehicle", "pump")
READ_ONLY = ("id", "builtin", "createdAt", "updatedAt")
MAX_ID = 2**63 - 1


class RuleIn(BaseModel):
    """A rule's fields as given; which were given matters (`model_fields_set`): null clears a field."""

    model_config = ConfigDict(extra="forbid", strict=True)
    type: str | None = None
    deviceId: str | None = None
    kind: Literal["meter", "vehicle", "pump"] | None = None
    target: str | None = None
    thresholdLow: Finite | None = None
    thresholdHigh: Finite | None = None
    clearLow: Finite | None = None
    clearHigh: Finite | None = None
    severity: str | None = None
    enabled: bool | None = None
    description: Annotated[str, Field(max_length=500)] | None = None


# ---- JSON shapes --------------------------------------------------------------------------------


def rule_json(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "type": row["type"],
        "deviceId": row["device_id"],
        "kind": row["kind"],
        "target": row["target"],
        "thresholdLow": row["threshold_low"],
        "thresholdHigh": row["threshold_high"],
        "clearLow": row["clear_low"],
        "clearHigh": row["clear_high"],
        "severity": row["severity"],
        "enabled": row["enabled"],
        "builtin": row["builtin"],
        "description": row["description"],
        "createdAt": iso(row["created_at"]),
        "updatedAt": iso(row["updated_at"]),
    }


def alert_json(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "deviceId": row["device_id"],
        "kind": row["kind"],
        "ruleId": row["rule_id"],
        "type": row["type"],
        "severity": row["severity"],
        "state": row["state"],
        "active": row["state"] == "active",
        "message": row["message"],
        "value": row["value"],
        "resolvedValue": row["resolved_value"],
        "raisedAt": iso(row["raised_at"]),
        "resolvedAt": iso(row["resolved_at"]),
        "acknowledged": row["acknowledged_at"] is not None,
        "acknowledgedAt": iso(row["acknowledged_at"]),
        "acknowledgedBy": row["acknowledged_by"],
    }


def event_json(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "alertId": row["alert_id"],
        "deviceId": row["device_id"],
        "kind": row["kind"],
        "ruleId": row["rule_id"],
        "type": row["type"],
        "severity": row["severity"],
        "event": row["event"],
        "timestamp": iso(row["ts"]),
        "value": row["value"],
        "message": row["message"],
    }


def live_message(alert: dict[str, Any]) -> dict[str, Any] | None:
    """The WebSocket message for an alert the bridge announced: PUMP's `alert_triggered` fields
    (`device_id`, `alert_type`, `message`, `severity`, `timestamp`) plus ours (`deviceId`, the whole `alert`)."""
    type_ = {"raised": "alert_triggered", "resolved": "alert_resolved"}.get(alert.get("event") or "")
    if type_ is None:
        return None
    return {
        "type": type_,
        "deviceId": alert.get("deviceId"),
        "device_id": alert.get("deviceId"),
        "alert_type": alert.get("type"),
        "message": alert.get("note") if type_ == "alert_resolved" and alert.get("note") else alert.get("message"),
        "severity": alert.get("severity"),
        "timestamp": alert.get("timestamp"),
        "alert": alert,
    }


# ---- query parameters ---------------------------------------------------------------------------


def _bool(request: Request, name: str) -> bool | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return None
    if raw.lower() in ("true", "1", "yes"):
        return True
    if raw.lower() in ("false", "0", "no"):
        return False
    raise ApiError(400, f"{name}: expected true or false, got {raw!r}")


def _choices(request: Request, name: str, allowed: tuple[str, ...] | frozenset[str]) -> list[str] | None:
    raw = request.query_params.get(name)
    if not raw:
        return None
    values = [v.strip() for v in raw.split(",") if v.strip()]
    bad = [v for v in values if v not in allowed]
    if bad:
        raise ApiError(400, f"{name}: unknown {', '.join(bad)}; expected {', '.join(sorted(allowed))}")
    return values


def _id(request: Request) -> int:
    """The `{id}` of the path; beyond bigint nothing can exist."""
    value: int = request.path_params["id"]
    if value > MAX_ID:
        raise NotFound(f"no such id {value}")
    return value


def _device(value: str | None, name: str = "deviceId") -> str | None:
    if value is not None and not topics.DEVICE_ID.match(value):
        raise ApiError(400, f"{name}: not a device id: {value!r}")
    return value


def _filters(request: Request, time_column: str, device_id: str | None = None) -> tuple[list[str], list[Any]]:
    """The WHERE clauses and parameters shared by the alert list and the event log (only those asked for)."""
    q = request.query_params
    where: list[str] = []
    params: list[Any] = []

    def add(clause: str, value: Any) -> None:
        if value is not None:
            where.append(clause)
            params.append(value)

    add("device_id = %s", _device(device_id or q.get("deviceId") or None))
    add("kind = ANY(%s)", _choices(request, "kind", KINDS))
    add("type = ANY(%s)", _choices(request, "type", frozenset(engine.TYPES)))
    add("severity = ANY(%s)", _choices(request, "severity", engine.SEVERITIES))
    start, end = query_time(request, "from", None), query_time(request, "to", None)
    if start and end and start >= end:
        raise ApiError(400, "`from` must be before `to`")
    add(f"{time_column} >= %s", start)
    add(f"{time_column} < %s", end)
    return where, params


def _sql(columns: str, table: str, where: list[str], order: str) -> tuple[str, str]:
    clause = f" WHERE {' AND '.join(where)}" if where else ""
    return (
        f"SELECT {columns} FROM {table}{clause} ORDER BY {order} LIMIT %s OFFSET %s",  # noqa: S608
        f"SELECT count(*) AS n FROM {table}{clause}",  # noqa: S608
    )


async def _page(
    request: Request, columns: str, table: str, where: list[str], params: list[Any], order: str
) -> tuple[list[dict[str, Any]], int]:
    limit, offset = paging(request)
    rows_sql, count_sql = _sql(columns, table, where, order)
    async with request.state.services.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(rows_sql, [*params, limit, offset])
        rows = await cur.fetchall()
        await cur.execute(count_sql, params)
        counted = await cur.fetchone()
    return rows, int(counted["n"]) if counted else 0


# ---- alerts and the log -------------------------------------------------------------------------


async def _list_alerts(request: Request, *, active: bool | None = None, device_id: str | None = None) -> Response:
    where, params = _filters(request, "raised_at", device_id)
    state = request.query_params.get("state") or None
    if state is not None and state not in ("active", "resolved"):
        raise ApiError(400, f"state: expected active or resolved, got {state!r}")
    wanted = _bool(request, "active")
    if active is not None:
        wanted = active
    if wanted is not None:
        state = "active" if wanted else "resolved"
    if state is not None:
        where.append("state = %s")
        params.append(state)
    acknowledged = _bool(request, "acknowledged")
    if acknowledged is not None:
        where.append("acknowledged_at IS NOT NULL" if acknowledged else "acknowledged_at IS NULL")
    rows, total = await _page(request, ALERT_COLUMNS, "alerts", where, params, "raised_at DESC, id DESC")
    return json_response([alert_json(r) for r in rows], headers={"X-Total-Count": str(total)})


async def list_alerts(request: Request) -> Response:
    return await _list_alerts(request)


async def list_active(request: Request) -> Response:
    return await _list_alerts(request, active=True)


async def device_alerts(request: Request) -> Response:
    return await _list_alerts(request, device_id=_device(request.path_params["deviceId"]))


async def get_alert(request: Request) -> Response:
    alert_id = _id(request)
    async with request.state.services.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(f"SELECT {ALERT_COLUMNS} FROM alerts WHERE id = %s", (alert_id,))  # noqa: S608
        row = await cur.fetchone()
    if row is None:
        raise NotFound(f"no alert {alert_id}")
    return json_response(alert_json(row))


_ACK = f"""
WITH a AS (
    UPDATE alerts SET acknowledged_at = now(), acknowledged_by = %(by)s
    WHERE id = %(id)s AND acknowledged_at IS NULL
    RETURNING {ALERT_COLUMNS}),
ev AS (
    INSERT INTO alert_events (alert_id, device_id, kind, rule_id, type, severity, event, ts, value, message)
    SELECT id, device_id, kind, rule_id, type, severity, 'acknowledged', acknowledged_at, value,
           coalesce('acknowledged by ' || acknowledged_by, 'acknowledged')
    FROM a)
SELECT {ALERT_COLUMNS} FROM a
"""  # noqa: S608


async def acknowledge(request: Request) -> Response:
    """Acknowledge an alert (active or resolved); acknowledging it again changes nothing."""
    alert_id = _id(request)
    body: Any = {}
    if await request.body():
        body = await read_json(request)
    by = body.get("by", body.get("acknowledgedBy")) if isinstance(body, dict) else None
    if by is not None and (not isinstance(by, str) or len(by) > 128):
        raise Invalid("invalid body", details=[{"field": "by", "message": "a name of at most 128 characters"}])
    async with request.state.services.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(_ACK, {"id": alert_id, "by": by})
        row = await cur.fetchone()
        if row is None:
            await cur.execute(f"SELECT {ALERT_COLUMNS} FROM alerts WHERE id = %s", (alert_id,))  # noqa: S608
            row = await cur.fetchone()
    if row is None:
        raise NotFound(f"no alert {alert_id}")
    return json_response(alert_json(row))


async def list_events(request: Request) -> Response:
    where, params = _filters(request, "ts")
    events = _choices(request, "event", ("raised", "resolved", "acknowledged"))
    if events:
        where.append("event = ANY(%s)")
        params.append(events)
    raw_id = request.query_params.get("alertId")
    if raw_id:
        if not raw_id.isdigit():
            raise ApiError(400, f"alertId: expected an alert id, got {raw_id!r}")
        where.append("alert_id = %s")
        params.append(int(raw_id))
    rows, total = await _page(request, EVENT_COLUMNS, "alert_events", where, params, "ts DESC, id DESC")
    return json_response([event_json(r) for r in rows], headers={"X-Total-Count": str(total)})


# ---- rules --------------------------------------------------------------------------------------


async def _body(request: Request) -> RuleIn:
    data = await read_json(request)
    if not isinstance(data, dict):
        raise Invalid("body must be a JSON object", details=[{"field": "(body)", "message": "not an object"}])
    for name in READ_ONLY:  # a rule as GET returned it may be sent back whole
        data.pop(name, None)
    try:
        return RuleIn.model_validate(data)
    except ValidationError as exc:
        raise Invalid("invalid rule", details=explain(exc)) from exc


def _checked(rule: dict[str, Any]) -> dict[str, Any]:
    """Fill the kind a type implies, then 422 with every problem."""
    spec = engine.TYPES.get(rule.get("type") or "")
    if spec is not None and spec.kind is not None and rule.get("kind") is None:
        rule["kind"] = spec.kind
    problems = engine.rule_problems(rule)
    if problems:
        raise Invalid("invalid rule", details=problems)
    return rule


async def _notify(cur: Any) -> None:
    await cur.execute("SELECT pg_notify(%s, '')", (engine.RULES_CHANNEL,))


async def list_rules(request: Request) -> Response:
    where: list[str] = []
    params: list[Any] = []
    device_id = _device(request.query_params.get("deviceId") or None)
    if device_id is not None:
        where.append("device_id = %s")
        params.append(device_id)
    for name, allowed in (("kind", KINDS), ("type", tuple(engine.TYPES))):
        chosen = _choices(request, name, allowed)
        if chosen:
            where.append(f"{name} = ANY(%s)")
            params.append(chosen)
    enabled = _bool(request, "enabled")
    if enabled is not None:
        where.append("enabled = %s")
        params.append(enabled)
    rows, total = await _page(request, RULE_COLUMNS, "alert_rules", where, params, "id")
    return json_response([rule_json(r) for r in rows], headers={"X-Total-Count": str(total)})


async def create_rule(request: Request) -> Response:
    given = await _body(request)
    rule = _checked({"severity": "warning", "enabled": True, **given.model_dump(exclude_unset=True)})
    if rule.get("severity") is None or rule.get("enabled") is None:
        raise Invalid("invalid rule", details=[{"field": "severity/enabled", "message": "must not be null"}])
    names = [n for n in RULE_FIELDS if n in rule]
    columns = ", ".join(RULE_FIELDS[n] for n in names)
    marks = ", ".join(["%s"] * len(names))
    async with request.state.services.pool.connection() as conn, conn.transaction():
        async with conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(
                f"INSERT INTO alert_rules ({columns}) VALUES ({marks}) RETURNING {RULE_COLUMNS}",  # noqa: S608
                [rule[n] for n in names],
            )
            row = await cur.fetchone()
            await _notify(cur)
    assert row is not None
    return json_response(rule_json(row), 201)


async def _rule(cur: Any, rule_id: int, *, lock: bool = False) -> dict[str, Any]:
    await cur.execute(
        f"SELECT {RULE_COLUMNS} FROM alert_rules WHERE id = %s" + (" FOR UPDATE" if lock else ""),  # noqa: S608
        (rule_id,),
    )
    row = await cur.fetchone()
    if row is None:
        raise NotFound(f"no alert rule {rule_id}")
    return dict(row)


async def get_rule(request: Request) -> Response:
    async with request.state.services.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        row = await _rule(cur, _id(request))
    return json_response(rule_json(row))


async def update_rule(request: Request) -> Response:
    """PUT and PATCH: the fields given replace the rule's (null clears one); the result is checked whole."""
    rule_id = _id(request)
    given = (await _body(request)).model_dump(exclude_unset=True)
    if given.get("severity", "") is None or given.get("enabled", False) is None:
        raise Invalid("invalid rule", details=[{"field": "severity/enabled", "message": "must not be null"}])
    async with request.state.services.pool.connection() as conn, conn.transaction():
        async with conn.cursor(row_factory=dict_row) as cur:
            row = await _rule(cur, rule_id, lock=True)
            current = {name: row[column] for name, column in RULE_FIELDS.items()}
            fixed = sorted(n for n in set(given) - TUNABLE if given[n] != current[n])
            if row["builtin"] and fixed:
                raise Conflict(
                    f"a built-in rule keeps its {', '.join(fixed)}; create a rule for the device or kind instead"
                )
            rule = _checked({**current, **given})
            names = list(RULE_FIELDS)
            sets = ", ".join(f"{RULE_FIELDS[n]} = %s" for n in names)
            await cur.execute(
                f"UPDATE alert_rules SET {sets}, updated_at = now() WHERE id = %s RETURNING {RULE_COLUMNS}",  # noqa: S608
                [*(rule[n] for n in names), rule_id],
            )
            updated = await cur.fetchone()
            await _notify(cur)
    assert updated is not None
    return json_response(rule_json(updated))


async def delete_rule(request: Request) -> Response:
    """Its active alerts are resolved by the bridge within seconds (the rule no longer applies)."""
    rule_id = _id(request)
    async with request.state.services.pool.connection() as conn, conn.transaction():
        async with conn.cursor(row_factory=dict_row) as cur:
            row = await _rule(cur, rule_id, lock=True)
            if row["builtin"]:
                raise Conflict('a built-in rule cannot be deleted; disable it with {"enabled": false}')
            await cur.execute("DELETE FROM alert_rules WHERE id = %s", (rule_id,))
            await _notify(cur)
    return Response(status_code=204)


# ---- device health (for the HES polling view) ----------------------------------------------------


_HEALTH = """
    SELECT d.device_id, d.kind, d.status, d.last_seen,
           coalesce(d.expected_interval_s, %(interval)s) AS expected_interval_s,
           extract(epoch FROM now() - d.last_seen)::float8 AS silent_s,
           coalesce(jsonb_agg(jsonb_build_object('id', a.id, 'type', a.type, 'severity', a.severity,
                                                 'raisedAt', a.raised_at) ORDER BY a.raised_at)
                    FILTER (WHERE a.id IS NOT NULL), '[]') AS active
    FROM devices d
    LEFT JOIN alerts a ON a.device_id = d.device_id AND a.state = 'active'
    WHERE d.device_id = ANY(%(ids)s)
    GROUP BY d.device_id
"""


async def device_health(conn: Any, device_ids: list[str], expected_interval: float) -> dict[str, dict[str, Any]]:
    """Per device: status, last report, expected interval, seconds silent, overdue, active alerts (one query).

    For `GET /api/meters/polling/status` and the like to merge into their per-device entries.
    """
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(_HEALTH, {"ids": device_ids, "interval": expected_interval})
        rows = await cur.fetchall()
    out = {}
    for r in rows:
        active = r["active"] if isinstance(r["active"], list) else orjson.loads(r["active"])
        out[r["device_id"]] = {
            "status": r["status"],
            "lastReport": iso(r["last_seen"]),
            "expectedIntervalSeconds": r["expected_interval_s"],
            "secondsSinceReport": round(max(r["silent_s"], 0.0), 3),
            "overdue": r["silent_s"] > r["expected_interval_s"],
            "activeAlerts": active,
        }
    return out


routes: list[BaseRoute] = [
    Route("/api/v1/alerts", list_alerts, methods=["GET"]),
    Route("/api/v1/alerts/active", list_active, methods=["GET"]),
    Route("/api/v1/alerts/events", list_events, methods=["GET"]),
    Route("/api/v1/alerts/rules", list_rules, methods=["GET"]),
    Route("/api/v1/alerts/rules", create_rule, methods=["POST"]),
    Route("/api/v1/alerts/rules/{id:int}", get_rule, methods=["GET"]),
    Route("/api/v1/alerts/rules/{id:int}", update_rule, methods=["PUT", "PATCH"]),
    Route("/api/v1/alerts/rules/{id:int}", delete_rule, methods=["DELETE"]),
    Route("/api/v1/alerts/{id:int}", get_alert, methods=["GET"]),
    Route("/api/v1/alerts/{id:int}/ack", acknowledge, methods=["POST"]),
    Route("/api/v1/alerts/{id:int}/acknowledge", acknowledge, methods=["POST"]),
    Route("/api/v1/devices/{deviceId}/alerts", device_alerts, methods=["GET"]),
]
