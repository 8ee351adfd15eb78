"""WebSocket `/ws`: dashboards and device views subscribe; the hub relays what the bridge committed.

Every client has a bounded outgoing queue drained by its own sender task. Broadcasts only ever
`put_nowait`: a client whose queue is full is dropped (close code 1013, "too slow"), so one slow
reader can never stall the others or the MQTT listener that feeds the hub. Replies to a client's own
requests wait for room in its queue instead (that only slows the client that asked).

The hub speaks to its clients through `Transport` (`send_text`, `close`), which a Starlette
WebSocket already is; any other transport (e.g. Socket.IO) can reuse the hub the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Protocol

import orjson
import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from starlette.routing import BaseRoute, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnected, WebSocketState

from bridge import committed, topics
from bridge.energy import BLOCK, block_start

from . import alerts as alerts_api
from . import ingest
from .config import ApiSettings
from .errors import ApiError, Invalid, NotFound, Unavailable, error_body
from .mqtt import MqttLink
from .responses import dumps, iso

log = logging.getLogger(__name__)

MAX_MESSAGE = 64 * 1024  # a client message larger than this is refused (the device payload limit)
MAX_ROOMS = 1000  # rooms per client: bounds what one connection can make the hub hold
REPLY_TIMEOUT = 10.0  # a client that does not take its own replies for this long is dropped
CLOSE_TIMEOUT = 10.0
DASHBOARD_BACKLOG = 100  # committed notes waiting for their block query; the oldest go first
SNAPSHOT_LIMIT = 1000  # meters in the `dashboard:registered` snapshot
ROOM = re.compile(r"^[A-Za-z0-9_.:-]{1,80}$")


class Transport(Protocol):
    async def send_text(self, data: str) -> None: ...

    async def close(self, code: int = 1000, reason: str | None = None) -> None: ...


@dataclass(eq=False)
class Client:
    """One connection: what it subscribed to and its outgoing queue (JSON text, encoded once per broadcast)."""

    transport: Transport
    queue: asyncio.Queue[str]
    rooms: set[str] = field(default_factory=set)
    simulators: set[str] = field(default_factory=set)
    closed: bool = False
    sender: asyncio.Task[None] | None = None


@dataclass(frozen=True)
class MeterSample:
    """The newest reading of one meter in a committed note, waiting for its block totals."""

    meter_id: str
    ts: datetime
    timestamp: str
    data: dict[str, Any]


def _encode(message: dict[str, Any]) -> str:
    return dumps(message).decode()


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _device_id(msg: dict[str, Any], field_name: str = "deviceId") -> str:
    value = msg.get(field_name)
    if not isinstance(value, str) or not topics.DEVICE_ID.match(value):
        raise Invalid(
            f"{field_name} must be a device id",
            details=[{"field": field_name, "message": "must match [A-Za-z0-9_.:-]{1,64}"}],
        )
    return value


def _parse_ts(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        ts = datetime.fromisoformat(value)
    except ValueError:
        return None
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)


def error_message(exc: ApiError, request: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "error", **error_body(exc.status, exc.message, exc.code, exc.details)}
    if request:
        out["request"] = request
    return out


# The latest state of one device or of all, as `device_update` data (pump: the full PUMP document).
_LATEST_ONE = """
    SELECT device_id, 'pump' AS kind, ts, status AS data FROM pump_latest WHERE device_id = %(id)s
    UNION ALL
    SELECT meter_id, 'meter', ts, jsonb_build_object(
        'totalPowerKw', power_kw, 'kwhConsumedAc', kwh_consumed_ac, 'energyTotalKwh', energy_total_kwh,
        'voltage', voltage, 'current', current, 'frequency', frequency, 'powerFactor', power_factor)
    FROM meter_latest WHERE meter_id = %(id)s
    UNION ALL
    SELECT vehicle_id, 'vehicle', ts, jsonb_build_object(
        'soc', soc, 'kwhDeliveredDc', kwh_delivered_dc, 'batteryTemp', battery_temp)
    FROM vehicle_latest WHERE vehicle_id = %(id)s
"""
_LATEST_ALL = """
    SELECT device_id, 'pump' AS kind, ts, status AS data FROM pump_latest
    UNION ALL
    SELECT meter_id, 'meter', ts, jsonb_build_object(
        'totalPowerKw', power_kw, 'kwhConsumedAc', kwh_consumed_ac, 'energyTotalKwh', energy_total_kwh,
        'voltage', voltage, 'current', current, 'frequency', frequency, 'powerFactor', power_factor)
    FROM meter_latest
    UNION ALL
    SELECT vehicle_id, 'vehicle', ts, jsonb_build_object(
        'soc', soc, 'kwhDeliveredDc', kwh_delivered_dc, 'batteryTemp', battery_temp)
    FROM vehicle_latest
    ORDER BY 1
"""
# One query per committed note: each meter's device row and the blocks its new readings fall in.
_NOTE_BLOCKS = """
    SELECT d.device_id, d.status, d.last_seen, b.block_start, b.total_kwh, b.reading_count, b.is_peak
    FROM devices d
    LEFT JOIN meter_blocks_30m b
           ON b.meter_id = d.device_id AND b.meter_id = ANY(%(ids)s::text[])
          AND b.block_start = ANY(%(blocks)s::timestamptz[])
    WHERE d.device_id = ANY(%(ids)s::text[])
"""
_SNAPSHOT = """
    SELECT d.device_id, d.status, d.last_seen, l.ts, l.power_kw, l.kwh_consumed_ac, l.energy_total_kwh,
           l.voltage, l.current, l.frequency, l.power_factor, b.total_kwh, b.reading_count, b.is_peak
    FROM devices d
    LEFT JOIN meter_latest l ON l.meter_id = d.device_id
    LEFT JOIN meter_blocks_30m b
           ON b.meter_id = d.device_id AND b.block_start >= %(start)s AND b.block_start < %(end)s
    WHERE d.kind = 'meter'
    ORDER BY d.device_id
    LIMIT %(limit)s
"""


class Hub:
    """The live clients, their subscriptions, and the relay from `telemetry/committed` to them.

    Used by the rest of the API: `on_mqtt`, `push_device`, `push_room`, `push_dashboards`, `count`.
    """

    def __init__(self, settings: ApiSettings, pool: AsyncConnectionPool, mqtt: MqttLink) -> None:
        self.settings = settings
        self.pool = pool
        self.mqtt = mqtt
        self.clients: set[Client] = set()
        self.rooms: dict[str, set[Client]] = {}
        self.dashboards: set[Client] = set()
        self.dropped = 0
        self._closing: set[asyncio.Task[None]] = set()
        self._notes: asyncio.Queue[list[MeterSample]] = asyncio.Queue(DASHBOARD_BACKLOG)
        self._worker: asyncio.Task[None] | None = None
        self._handlers: dict[str, Callable[[Client, dict[str, Any]], Awaitable[None]]] = {
            "dashboard:register": self._dashboard_register,
            "subscribe_device": self._subscribe_device,
            "unsubscribe_device": self._unsubscribe_device,
            "get_current_status": self._get_current_status,
            "join-room": self._join_room,
            "leave-room": self._leave_room,
            "simulator:register": self._simulator_register,
            "simulator:reading": self._simulator_reading,
        }

    @property
    def count(self) -> int:
        return len(self.clients)

    async def __aenter__(self) -> Hub:
        self._worker = asyncio.create_task(self._dashboard_loop(), name="ws-dashboards")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._worker:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        for client in list(self.clients):
            self.drop(client, 1001, "server shutting down")
        if self._closing:
            await asyncio.wait(self._closing, timeout=CLOSE_TIMEOUT)

    # ---- clients ----------------------------------------------------------------------------

    def connect(self, transport: Transport) -> Client:
        client = Client(transport, asyncio.Queue(self.settings.ws_queue))
        client.sender = asyncio.create_task(self._send_loop(client), name="ws-sender")
        self.clients.add(client)
        return client

    async def disconnect(self, client: Client) -> None:
        """The connection ended (the endpoint's cleanup): forget the client and stop its sender."""
        self._detach(client)
        if client.sender and client.sender is not asyncio.current_task():
            client.sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await client.sender

    def drop(self, client: Client, code: int, reason: str) -> None:
        """Forget the client now and close its connection in the background (closing may take a while)."""
        if client.closed:
            return
        self._detach(client)
        self.dropped += 1
        task = asyncio.create_task(self._close(client, code, reason), name="ws-close")
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close(self, client: Client, code: int, reason: str) -> None:
        sender = client.sender
        if sender and not sender.done():
            sender.cancel()
            await asyncio.wait([sender])
        try:
            await asyncio.wait_for(client.transport.close(code, reason), CLOSE_TIMEOUT)
        except Exception as exc:  # already gone: nothing left to close
            log.debug("closing a WebSocket client failed: %s", exc)

    def _detach(self, client: Client) -> None:
        client.closed = True
        self.clients.discard(client)
        self.dashboards.discard(client)
        for room in client.rooms:
            members = self.rooms.get(room)
            if members is not None:
                members.discard(client)
                if not members:
                    del self.rooms[room]
        client.rooms.clear()

    async def _send_loop(self, client: Client) -> None:
        try:
            while True:
                text = await client.queue.get()
                await client.transport.send_text(text)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the connection is gone; the endpoint sees the disconnect and cleans up
            log.debug("WebSocket send failed: %s", exc)
            self._detach(client)

    def _offer(self, client: Client, text: str) -> None:
        if client.closed:
            return
        try:
            client.queue.put_nowait(text)
        except asyncio.QueueFull:
            log.warning("dropping a WebSocket client %d messages behind", client.queue.qsize())
            self.drop(client, 1013, "too slow")

    def _broadcast(self, targets: Iterable[Client], message: dict[str, Any]) -> None:
        targets = list(targets)  # dropping a client changes the sets we were given
        if not targets:
            return
        text = _encode(message)
        for client in targets:
            self._offer(client, text)

    async def reply(self, client: Client, message: dict[str, Any]) -> None:
        """To the client that asked: waits for room in its queue (only that client is slowed)."""
        if client.closed:
            return
        try:
            await asyncio.wait_for(client.queue.put(_encode(message)), REPLY_TIMEOUT)
        except TimeoutError:
            self.drop(client, 1013, "too slow")

    def _join(self, client: Client, room: str) -> None:
        if room in client.rooms:
            return
        if len(client.rooms) >= MAX_ROOMS:
            raise ApiError(429, f"at most {MAX_ROOMS} subscriptions per connection")
        client.rooms.add(room)
        self.rooms.setdefault(room, set()).add(client)

    def _leave(self, client: Client, room: str) -> None:
        client.rooms.discard(room)
        members = self.rooms.get(room)
        if members is not None:
            members.discard(client)
            if not members:
                del self.rooms[room]

    # ---- pushes (also used by the commands module) --------------------------------------------

    async def push_device(self, device_id: str, message: dict[str, Any]) -> None:
        """To clients that subscribed to the device (`subscribe_device`, room `device-<id>`)."""
        self._broadcast(self.rooms.get(f"device-{device_id}", ()), message)

    async def push_room(self, room: str, message: dict[str, Any]) -> None:
        """To clients in a room (`join-room`, e.g. `meter-<id>`)."""
        self._broadcast(self.rooms.get(room, ()), message)

    async def push_dashboards(self, message: dict[str, Any]) -> None:
        """To clients that sent `dashboard:register`."""
        self._broadcast(self.dashboards, message)

    def _device_and(self, device_id: str, others: Iterable[Client]) -> set[Client]:
        return set(self.rooms.get(f"device-{device_id}", ())) | set(others)

    # ---- what the bridge committed ------------------------------------------------------------

    async def on_mqtt(self, topic: str, data: Any) -> None:
        if topic != committed.TOPIC or not isinstance(data, dict) or not self.clients:
            return
        newest: dict[str, MeterSample] = {}
        for rec in committed.records(data):
            self._relay_record(rec, newest)
        for change in data.get("statusChanges") or ():
            if isinstance(change, dict):
                self._relay_status(change)
        for alert in data.get("alerts") or ():
            if isinstance(alert, dict):
                self._relay_alert(alert)
        if newest and self.dashboards:
            # the block query runs in its own task: a slow database must not hold up the MQTT listener
            if self._notes.full():
                self._notes.get_nowait()
            self._notes.put_nowait(list(newest.values()))

    def _relay_record(self, rec: dict[str, Any], newest: dict[str, MeterSample]) -> None:
        kind, device_id, rtype = rec.get("kind"), rec.get("deviceId"), rec.get("type")
        stamp, data = rec.get("ts"), rec.get("data")
        if not isinstance(device_id, str) or not isinstance(data, dict):
            return
        if kind == "meter" and rtype in ("reading", "obis"):
            reading = {"timestamp": stamp, **data}
            self._broadcast(
                self.rooms.get(f"meter-{device_id}", ()),
                {"type": "meter-reading-update", "meterId": device_id, "reading": reading},
            )
            if rtype == "reading":
                update = {"type": "device_update", "deviceId": device_id, "kind": kind, "data": reading}
                self._broadcast(self.rooms.get(f"device-{device_id}", ()), {**update, "timestamp": stamp})
                ts = _parse_ts(stamp)
                seen = newest.get(device_id)
                if ts is not None and isinstance(stamp, str) and (seen is None or ts >= seen.ts):
                    newest[device_id] = MeterSample(device_id, ts, stamp, data)
        elif kind == "pump" and rtype == "status":
            doc = {"device_id": device_id, "timestamp": stamp, **data}
            self._broadcast(
                self.rooms.get(f"device-{device_id}", ()),
                {"type": "device_update", "deviceId": device_id, "kind": kind, "data": doc, "timestamp": stamp},
            )
        elif kind == "pump" and rtype == "event":
            self._broadcast(
                self.rooms.get(f"device-{device_id}", ()),
                {"type": "pump_event", "deviceId": device_id, "data": data, "timestamp": stamp},
            )
        elif kind == "vehicle" and rtype == "reading":
            self._broadcast(
                self.rooms.get(f"device-{device_id}", ()),
                {
                    "type": "device_update",
                    "deviceId": device_id,
                    "kind": kind,
                    "data": {"timestamp": stamp, **data},
                    "timestamp": stamp,
                },
            )

    def _relay_status(self, change: dict[str, Any]) -> None:
        device_id, kind, status = change.get("deviceId"), change.get("kind"), change.get("status")
        if not isinstance(device_id, str):
            return
        now = _now()
        if status == "offline":
            self._broadcast(
                self._device_and(device_id, self.dashboards),
                {"type": "device_offline", "deviceId": device_id, "kind": kind, "timestamp": now},
            )
        if kind == "meter":
            self._broadcast(
                set(self.rooms.get(f"meter-{device_id}", ())) | self.dashboards,
                {"type": "meter-status-change", "meterId": device_id, "status": status, "timestamp": now},
            )

    def _relay_alert(self, alert: dict[str, Any]) -> None:
        """`alert_triggered` / `alert_resolved` to the device's subscribers and dashboards (bridge.alerts)."""
        device_id = alert.get("deviceId")
        if not isinstance(device_id, str):
            return
        message = alerts_api.live_message(alert)
        if message is not None:
            self._broadcast(self._device_and(device_id, self.dashboards), message)

    async def _dashboard_loop(self) -> None:
        while True:
            samples = await self._notes.get()
            try:
                await self._dashboard_updates(samples)
            except (psycopg.Error, PoolTimeout) as exc:
                log.warning("dashboard update skipped, database unavailable: %s", exc)
            except Exception:
                log.exception("dashboard update failed")

    async def _dashboard_updates(self, samples: list[MeterSample]) -> None:
        if not self.dashboards:
            return
        ids = [s.meter_id for s in samples]
        starts = sorted({block_start(s.ts) for s in samples})
        async with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(_NOTE_BLOCKS, {"ids": ids, "blocks": starts})
            rows = await cur.fetchall()
        devices = {r["device_id"]: r for r in rows}
        blocks = {(r["device_id"], r["block_start"]): r for r in rows if r["block_start"] is not None}
        for s in samples:
            start = block_start(s.ts)
            device = devices.get(s.meter_id) or {}
            block = blocks.get((s.meter_id, start))
            meter = {
                "deviceId": s.meter_id,
                "status": device.get("status", "online"),
                "lastSeen": iso(device.get("last_seen")) or s.timestamp,
            }
            await self.push_dashboards(
                {
                    "type": "dashboard:update",
                    "meter": meter,
                    "reading": {"timestamp": s.timestamp, **s.data},
                    **self._block_parts(s.meter_id, start, block),
                }
            )

    def _is_peak(self, start: datetime) -> bool:
        local = start.astimezone(self.settings.core.site_timezone)
        return self.settings.core.peak_window.contains(local.time())

    def _block_parts(self, meter_id: str, start: datetime, row: dict[str, Any] | None) -> dict[str, Any]:
        """`currentBlock` and `blockInfo` of the block starting at `start` (zero totals when it has none)."""
        end = start + BLOCK
        is_peak = bool(row["is_peak"]) if row and row["is_peak"] is not None else self._is_peak(start)
        remaining = max(0, math.ceil((end - datetime.now(UTC)).total_seconds() / 60))
        return {
            "currentBlock": {
                "deviceId": meter_id,
                "start": iso(start),
                "end": iso(end),
                "isPeakHour": is_peak,
                "totalKwh": float(row["total_kwh"] or 0.0) if row else 0.0,
                "readingCount": int(row["reading_count"] or 0) if row else 0,
            },
            "blockInfo": {"start": iso(start), "end": iso(end), "isPeakHour": is_peak, "minutesRemaining": remaining},
        }

    # ---- client messages ----------------------------------------------------------------------

    async def handle(self, client: Client, raw: str | bytes | None) -> None:
        """One client message; any failure is answered with an `error` message and the connection stays."""
        request: str | None = None
        try:
            if not raw:
                raise ApiError(400, "empty message: a JSON object with a type is expected")
            if len(raw) > MAX_MESSAGE:
                raise ApiError(413, f"message of {len(raw)} bytes exceeds {MAX_MESSAGE}")
            try:
                msg = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                raise ApiError(400, f"message is not valid JSON: {exc}") from exc
            if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
                raise ApiError(400, 'a message is a JSON object with a string "type"')
            request = msg["type"]
            handler = self._handlers.get(request)
            if handler is None:
                raise ApiError(400, f"unknown message type {request!r}", details={"known": sorted(self._handlers)})
            await handler(client, msg)
        except ApiError as exc:
            await self.reply(client, error_message(exc, request))
        except (psycopg.OperationalError, PoolTimeout) as exc:
            log.warning("WebSocket %s: database unavailable: %s", request, exc)
            await self.reply(client, error_message(Unavailable("the database is not reachable"), request))
        except Exception:
            log.exception("WebSocket message %s failed", request)
            await self.reply(client, error_message(ApiError(500, "internal error"), request))

    async def _latest(self, device_id: str | None) -> list[dict[str, Any]]:
        async with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            if device_id is None:
                await cur.execute(_LATEST_ALL)
            else:
                await cur.execute(_LATEST_ONE, {"id": device_id})
            return await cur.fetchall()

    @staticmethod
    def _device_update(row: dict[str, Any]) -> dict[str, Any]:
        stamp = iso(row["ts"])
        data = row["data"] if row["kind"] == "pump" else {"timestamp": stamp, **row["data"]}
        return {
            "type": "device_update",
            "deviceId": row["device_id"],
            "kind": row["kind"],
            "data": data,
            "timestamp": stamp,
        }

    async def _dashboard_register(self, client: Client, msg: dict[str, Any]) -> None:
        # registered before the snapshot is read, so no update between the two is missed
        self.dashboards.add(client)
        start = block_start(datetime.now(UTC))
        async with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(_SNAPSHOT, {"start": start, "end": start + BLOCK, "limit": SNAPSHOT_LIMIT})
            rows = await cur.fetchall()
        meters = []
        for r in rows:
            reading = None
            if r["ts"] is not None:
                reading = {
                    "timestamp": iso(r["ts"]),
                    "totalPowerKw": r["power_kw"],
                    "kwhConsumedAc": r["kwh_consumed_ac"],
                    "energyTotalKwh": r["energy_total_kwh"],
                    "voltage": r["voltage"],
                    "current": r["current"],
                    "frequency": r["frequency"],
                    "powerFactor": r["power_factor"],
                }
            block = r if r["total_kwh"] is not None else None
            meters.append(
                {
                    "meter": {"deviceId": r["device_id"], "status": r["status"], "lastSeen": iso(r["last_seen"])},
                    "reading": reading,
                    "currentBlock": self._block_parts(r["device_id"], start, block)["currentBlock"],
                }
            )
        info = self._block_parts("", start, None)["blockInfo"]
        await self.reply(client, {"type": "dashboard:registered", "meters": meters, "blockInfo": info})
        # EMS's own dashboard waits for this name (docs/migrating.md)
        await self.reply(client, {"type": "dashboard:initial", "meters": meters, "blockInfo": info})

    async def _subscribe_device(self, client: Client, msg: dict[str, Any]) -> None:
        device_id = _device_id(msg)
        self._join(client, f"device-{device_id}")
        await self.reply(client, {"type": "subscribed", "deviceId": device_id})
        for row in await self._latest(device_id):
            await self.reply(client, self._device_update(row))

    async def _unsubscribe_device(self, client: Client, msg: dict[str, Any]) -> None:
        device_id = _device_id(msg)
        self._leave(client, f"device-{device_id}")
        await self.reply(client, {"type": "unsubscribed", "deviceId": device_id})

    async def _get_current_status(self, client: Client, msg: dict[str, Any]) -> None:
        device_id = _device_id(msg) if msg.get("deviceId") is not None else None
        rows = await self._latest(device_id)
        if device_id is not None and not rows:
            raise NotFound(f"no status known for device {device_id!r}")
        for row in rows:
            await self.reply(client, self._device_update(row))

    def _room(self, msg: dict[str, Any]) -> str:
        room = msg.get("room")
        if not isinstance(room, str) or not ROOM.match(room):
            raise Invalid(
                "room must be a room name such as meter-<id>",
                details=[{"field": "room", "message": "must match [A-Za-z0-9_.:-]{1,80}"}],
            )
        return room

    async def _join_room(self, client: Client, msg: dict[str, Any]) -> None:
        room = self._room(msg)
        self._join(client, room)
        await self.reply(client, {"type": "joined", "room": room})

    async def _leave_room(self, client: Client, msg: dict[str, Any]) -> None:
        room = self._room(msg)
        self._leave(client, room)
        await self.reply(client, {"type": "left", "room": room})

    async def _simulator_register(self, client: Client, msg: dict[str, Any]) -> None:
        device_id = _device_id(msg)
        if len(client.simulators) >= MAX_ROOMS:
            raise ApiError(429, f"at most {MAX_ROOMS} simulators per connection")
        client.simulators.add(device_id)
        await self.reply(client, {"type": "simulator:registered", "deviceId": device_id})

    async def _simulator_reading(self, client: Client, msg: dict[str, Any]) -> None:
        body = {k: v for k, v in msg.items() if k != "type"}
        fields = ingest.MODELS[("meter", "reading")][1]
        if not any(f in body for f in fields) and len(client.simulators) == 1:
            body["deviceId"] = next(iter(client.simulators))  # the one meter this simulator registered
        # exactly like HTTP ingestion: validate as the bridge would, publish, the bridge stores it
        accepted = await ingest.publish(self.settings, self.mqtt, "meter", "reading", body)
        await self.reply(client, {"type": "simulator:ack", **accepted})
        await self.reply(client, {"type": "simulator:acknowledged", **accepted})  # EMS's simulator's name


async def websocket_endpoint(websocket: WebSocket) -> None:
    hub: Hub = websocket.state.services.hub
    await websocket.accept()
    client = hub.connect(websocket)
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                break
            text = message.get("text")
            await hub.handle(client, text if text is not None else message.get("bytes"))
    except WebSocketDisconnected:
        pass
    finally:
        await hub.disconnect(client)
        if websocket.application_state == WebSocketState.CONNECTED and websocket.client_state != (
            WebSocketState.DISCONNECTED
        ):
            with contextlib.suppress(Exception):
                await websocket.close(1011, "server error")


# EMS served its WebSocket at the root; `/` stays the dashboard page for plain HTTP
routes: list[BaseRoute] = [WebSocketRoute("/ws", websocket_endpoint), WebSocketRoute("/", websocket_endpoint)]
