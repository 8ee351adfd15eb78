"""Commands to devices over MQTT, with a lifecycle: queued, sent, acked, failed, expired.

A command is stored `queued`, published at QoS 1 to `{meters|vehicles|pumps}/{id}/cmd` (over MQTT 5
with response topic `…/cmd/result` and the command id as correlation data) and marked `sent` once the
broker acknowledged it. The device answers on `…/cmd/result`; the bridge stores that answer (`acked`
or `failed`) and announces it on `telemetry/committed`, where we pick it up to wake waiters and tell
live clients. Commands nobody answered in time are swept to `expired`.

Devices the bridge takes through an adapter (Tasmota, Shelly, ESPHome: their `devices.meta.adapter`)
get relay commands in their own dialect instead (bridge.adapters); the bridge turns their answers into
the same `acked`/`failed`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from types import TracebackType
from typing import Any

import orjson
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from bridge import adapters, committed, topics

from .config import ApiSettings
from .errors import Conflict, Invalid, NotFound, Unavailable
from .live import Hub
from .mqtt import MqttLink
from .responses import iso, json_response, paging, read_json

log = logging.getLogger(__name__)

# Results reach us through the bridge's `telemetry/committed` notes, which the link always follows.
RESULT_TOPICS: tuple[str, ...] = ()
SWEEP_EVERY = 1.0
FINAL = frozenset({"acked", "failed", "expired"})
# Fields of a request body that are ours, never forwarded to the device.
RESERVED = frozenset({"command", "commandId", "force"})
# Other spellings of "start the pump" that must not slip past the dry-run protection.
PUMP_ON_ALIASES = frozenset({"pump_on", "start_pump", "pump_start"})

_INSERT = """
INSERT INTO commands (command_id, device_id, kind, command, payload, status, expires_at)
VALUES (%s, %s, %s, %s, %s, 'queued', now() + make_interval(secs => %s))
RETURNING created_at, expires_at
"""
# Only a queued command becomes sent: the device's answer may have been stored before our PUBACK came.
_MARK_SENT = """
WITH upd AS (
    UPDATE commands SET status = 'sent', updated_at = now()
    WHERE command_id = %s AND status = 'queued'
    RETURNING status, result
)
SELECT status, result FROM upd
UNION ALL
SELECT status, result FROM commands WHERE command_id = %s AND NOT EXISTS (SELECT 1 FROM upd)
"""
_EXPIRE = """
UPDATE commands SET status = 'expired', updated_at = now()
WHERE status IN ('queued', 'sent') AND expires_at < now()
RETURNING command_id, device_id, command
"""
_COLUMNS = "command_id, device_id, command, payload, status, result, created_at, updated_at, expires_at"


def command_json(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "commandId": row["command_id"],
        "deviceId": row["device_id"],
        "command": row["command"],
        "payload": row["payload"],
        "status": row["status"],
        "result": row["result"],
        "createdAt": iso(row["created_at"]),
        "updatedAt": iso(row["updated_at"]),
        "expiresAt": iso(row["expires_at"]),
    }


def result_message(command_id: str, device_id: str, command: str | None, status: str, result: Any) -> dict[str, Any]:
    """The live `command_result` message."""
    return {
        "type": "command_result",
        "commandId": command_id,
        "deviceId": device_id,
        "command": command,
        "status": status,
        "result": result,
    }


async def device_kind(pool: AsyncConnectionPool, device_id: str) -> str | None:
    """The kind of a known device, or None (ids that cannot exist are never looked up)."""
    if not topics.DEVICE_ID.match(device_id):
        return None
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT kind FROM devices WHERE device_id = %s", (device_id,))
        row = await cur.fetchone()
    return row[0] if row else None


async def device_adapter(pool: AsyncConnectionPool, device_id: str) -> dict[str, Any] | None:
    """The command address of a device the bridge takes through an adapter (Tasmota, Shelly, ESPHome)."""
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT meta->'adapter' FROM devices WHERE device_id = %s", (device_id,))
        row = await cur.fetchone()
    return row[0] if row and isinstance(row[0], dict) and row[0].get("firmware") else None


class Commands:
    def __init__(self, settings: ApiSettings, pool: AsyncConnectionPool, mqtt: MqttLink, hub: Hub) -> None:
        self.settings, self.pool, self.mqtt, self.hub = settings, pool, mqtt, hub
        self._waiters: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Commands:
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="command-expiry")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        tasks = [t for t in (self._sweeper, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for waiter in self._waiters.values():
            waiter.cancel()

    # ---- sending --------------------------------------------------------------------------

    async def send(
        self, device_id: str, kind: str, command: str, params: dict[str, Any], *, wait: float = 0.0
    ) -> dict[str, Any]:
        """Store, publish and mark sent; with `wait` > 0 also wait that long for the device's answer.

        Returns `{commandId, deviceId, command, status, result, createdAt, expiresAt}` where status is
        where the command stands when we return (`sent` if the device has not answered yet).
        """
        command_id = str(uuid.uuid4())
        message = {**params, "commandId": command_id, "command": command}
        dialect = await self._dialect(device_id, kind, command, params)
        if dialect is not None:
            message.update(dialect.stored)  # what the device's answer is matched against (bridge.adapters)
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                _INSERT, (command_id, device_id, kind, command, Jsonb(message), self.settings.command_timeout)
            )
            row = await cur.fetchone()
        assert row is not None
        created_at, expires_at = row
        waiter: asyncio.Future[dict[str, Any]] | None = None
        if wait > 0:
            # registered before publishing: the answer may come back before publish() returns
            waiter = asyncio.get_running_loop().create_future()
            self._waiters[command_id] = waiter
        try:
            status, result = await self._publish(device_id, kind, command_id, message, dialect)
            if waiter is not None and status not in FINAL:
                status, result = await self._wait(command_id, waiter, wait)
        finally:
            self._waiters.pop(command_id, None)
        return {
            "commandId": command_id,
            "deviceId": device_id,
            "command": command,
            "status": status,
            "result": result,
            "createdAt": iso(created_at),
            "expiresAt": iso(expires_at),
        }

    async def _dialect(
        self, device_id: str, kind: str, command: str, params: dict[str, Any]
    ) -> adapters.Dialect | None:
        """How an adapted device takes the command (None: a native device); 422 for what it cannot do."""
        address = await device_adapter(self.pool, device_id)
        if address is None:
            return None
        try:
            return adapters.command(address, kind, device_id, command, params, self.settings.core.shelly_rpc_src)
        except adapters.Unsupported as exc:
            raise Invalid(str(exc), details=[{"field": "command", "message": str(exc)}]) from exc

    async def _publish(
        self,
        device_id: str,
        kind: str,
        command_id: str,
        message: dict[str, Any],
        dialect: adapters.Dialect | None = None,
    ) -> tuple[str, Any]:
        topic = topics.device_topic(kind, device_id, "cmd")  # type: ignore[arg-type]
        try:
            if dialect is not None:
                for dialect_topic, payload in dialect.messages:
                    await self.mqtt.publish(dialect_topic, payload, qos=1)
            else:
                await self.mqtt.publish(
                    topic,
                    orjson.dumps(message),
                    qos=1,
                    response_topic=f"{topic}/result",
                    correlation=command_id.encode(),
                )
        except Unavailable as exc:
            # never reached the broker: it will not be delivered later either
            async with self.pool.connection() as conn:
                await conn.execute(
                    "UPDATE commands SET status = 'failed', result = %s, updated_at = now() "
                    "WHERE command_id = %s AND status = 'queued'",
                    (Jsonb({"status": "error", "message": exc.message}), command_id),
                )
            raise
        async with self.pool.connection() as conn:
            cur = await conn.execute(_MARK_SENT, (command_id, command_id))
            row = await cur.fetchone()
        return (row[0], row[1]) if row else ("sent", None)

    async def _wait(self, command_id: str, waiter: asyncio.Future[dict[str, Any]], wait: float) -> tuple[str, Any]:
        try:
            note = await asyncio.wait_for(waiter, wait)
            return note["status"], note["result"]
        except TimeoutError:
            pass
        # the committed note is QoS 0 and may be lost: the database has the last word
        async with self.pool.connection() as conn:
            cur = await conn.execute("SELECT status, result FROM commands WHERE command_id = %s", (command_id,))
            row = await cur.fetchone()
        return (row[0], row[1]) if row else ("sent", None)

    # ---- answers ----------------------------------------------------------------------------

    async def on_mqtt(self, topic: str, data: Any) -> None:
        """Watch the bridge's committed notes for stored `cmd/result` records."""
        if topic != committed.TOPIC or not isinstance(data, dict):
            return
        answers: dict[str, str] = {}
        for rec in data.get("records") or ():
            if not isinstance(rec, dict) or rec.get("type") != "cmd/result":
                continue
            payload = rec.get("data")
            command_id = payload.get("commandId") if isinstance(payload, dict) else None
            if isinstance(command_id, str) and isinstance(rec.get("deviceId"), str):
                answers[command_id] = rec["deviceId"]
        if answers:
            # off the link's dispatch loop, so a slow database never holds up live updates
            task = asyncio.create_task(self._resolve(answers))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _resolve(self, answers: dict[str, str]) -> None:
        try:
            async with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
                await cur.execute(
                    "SELECT command_id, device_id, command, status, result FROM commands WHERE command_id = ANY(%s)",
                    (list(answers),),
                )
                rows = await cur.fetchall()
        except Exception:
            log.exception("could not read the stored command results %s", list(answers))
            return
        for row in rows:
            # a device answering for another device's command was not stored by the bridge either
            if answers.get(row["command_id"]) != row["device_id"]:
                continue
            await self._announce(
                result_message(row["command_id"], row["device_id"], row["command"], row["status"], row["result"])
            )

    async def _announce(self, message: dict[str, Any]) -> None:
        waiter = self._waiters.get(message["commandId"])
        if waiter is not None and not waiter.done():
            waiter.set_result(message)
        try:
            await self.hub.push_device(message["deviceId"], message)
        except Exception:
            log.exception("pushing command_result %s failed", message["commandId"])

    # ---- expiry -----------------------------------------------------------------------------

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_EVERY)
            try:
                expired = await self.expire()
            except Exception as exc:
                log.warning("command expiry sweep failed: %s", exc)
                continue
            for command_id, device_id, command in expired:
                await self._announce(result_message(command_id, device_id, command, "expired", None))

    async def expire(self) -> list[tuple[str, str, str]]:
        """Mark every unanswered command past its deadline expired; return those."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(_EXPIRE)
            return [(r[0], r[1], r[2]) for r in await cur.fetchall()]


# ---- HTTP ---------------------------------------------------------------------------------------


def parse_command(body: Any) -> tuple[str, dict[str, Any], bool]:
    """`(command, params for the device, force)`; 422 listing what is wrong."""
    if not isinstance(body, dict):
        raise Invalid("body must be a JSON object", details=[{"field": "(body)", "message": "not an object"}])
    problems: list[dict[str, str]] = []
    command = body.get("command")
    if not isinstance(command, str) or not 1 <= len(command) <= 64:
        problems.append({"field": "command", "message": "a command name of 1 to 64 characters is required"})
    force = body.get("force", False)
    if not isinstance(force, bool):
        problems.append({"field": "force", "message": "must be true or false"})
    params = {k: v for k, v in body.items() if k not in RESERVED}
    if command == "pump":
        state = params.get("state")
        if isinstance(state, str) and state.lower() in ("on", "off"):
            params["state"] = state.lower()
        else:
            problems.append({"field": "state", "message": 'must be "on" or "off"'})
    elif command == "auto_mode" and not isinstance(params.get("enabled"), bool):
        problems.append({"field": "enabled", "message": "must be true or false"})
    if problems:
        raise Invalid("invalid command", details=problems)
    assert isinstance(command, str) and isinstance(force, bool)
    return command, params, force


def starts_pump(command: str, params: dict[str, Any]) -> bool:
    return (command == "pump" and params.get("state") == "on") or command in PUMP_ON_ALIASES


async def refuse_dry_run(request: Request, device_id: str) -> None:
    """409 unless the ground tank is known to hold water and its sensor is working."""
    services = request.state.services
    threshold = services.settings.pump_dry_run_percent
    async with services.pool.connection() as conn:
        cur = await conn.execute(
            "SELECT ground_level_percent, ground_sensor_working, (status->'ground_tank'->>'connected')::boolean, ts "
            "FROM pump_latest WHERE device_id = %s",
            (device_id,),
        )
        row = await cur.fetchone()
    hint = 'send "force": true to start the pump anyway'
    if row is None:
        raise Conflict(
            "the pump's tank levels are unknown (no status received yet)",
            details={"reason": "no_status", "hint": hint},
        )
    level, working, connected, ts = row
    facts = {
        "groundLevelPercent": level,
        "groundSensorWorking": working,
        "groundConnected": connected,
        "thresholdPercent": threshold,
        "statusTimestamp": iso(ts),
        "hint": hint,
    }
    if working is False or connected is False:
        raise Conflict("the ground tank sensor is offline", details={"reason": "ground_sensor_offline", **facts})
    if level is None or level < threshold:
        raise Conflict(
            f"the ground tank is below {threshold:g}%: the pump would run dry",
            details={"reason": "dry_run", **facts},
        )


async def post_command(request: Request) -> Response:
    device_id = request.path_params["deviceId"]
    body = await read_json(request)
    services = request.state.services
    kind = await device_kind(services.pool, device_id)
    if kind is None:
        raise NotFound(f"unknown device {device_id!r}")
    command, params, force = parse_command(body)
    if kind == "pump" and starts_pump(command, params) and not force:
        # a relay taken through an adapter has no tank sensors: there is no level to protect
        if await device_adapter(services.pool, device_id) is None:
            await refuse_dry_run(request, device_id)
    sent = await services.commands.send(device_id, kind, command, params)
    return json_response(sent, 202)


async def get_command(request: Request) -> Response:
    device_id, command_id = request.path_params["deviceId"], request.path_params["commandId"]
    async with request.state.services.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            f"SELECT {_COLUMNS} FROM commands WHERE command_id = %s AND device_id = %s",  # noqa: S608
            (command_id, device_id),
        )
        row = await cur.fetchone()
    if row is None:
        raise NotFound(f"no command {command_id!r} for device {device_id!r}")
    return json_response(command_json(row))


async def list_commands(request: Request) -> Response:
    """The device's commands, newest first."""
    device_id = request.path_params["deviceId"]
    limit, offset = paging(request)
    services = request.state.services
    if await device_kind(services.pool, device_id) is None:
        raise NotFound(f"unknown device {device_id!r}")
    async with services.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            f"SELECT {_COLUMNS} FROM commands WHERE device_id = %s "  # noqa: S608
            "ORDER BY created_at DESC, command_id LIMIT %s OFFSET %s",
            (device_id, limit, offset),
        )
        rows = await cur.fetchall()
    return json_response([command_json(r) for r in rows])


routes: list[BaseRoute] = [
    Route("/api/v1/devices/{deviceId}/commands", post_command, methods=["POST"]),
    Route("/api/v1/devices/{deviceId}/commands", list_commands, methods=["GET"]),
    Route("/api/v1/devices/{deviceId}/commands/{commandId}", get_command, methods=["GET"]),
]
