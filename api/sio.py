"""Socket.IO at `/socket.io/` for the PUMP and HES clients: the same hub, auth and slow-client policy as `/ws`.

Event names are the message `type`s (`subscribe_device`, `join-room`, `device_update`,
`meter-reading-update`, …). A Socket.IO connection is just another transport of the hub.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs

import orjson
import socketio

from .live import Client, Hub

log = logging.getLogger(__name__)


class SocketIOTransport:
    """What the hub needs of a connection (`send_text`, `close`), over a Socket.IO session."""

    def __init__(self, server: socketio.AsyncServer, sid: str) -> None:
        self.server, self.sid = server, sid

    async def send_text(self, data: str) -> None:
        message = orjson.loads(data)
        await self.server.emit(message.get("type", "message"), message, to=self.sid)

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        await self.server.disconnect(self.sid)


def _token(environ: dict[str, Any], auth: Any) -> bytes:
    if isinstance(auth, dict) and isinstance(auth.get("token"), str):
        return auth["token"].encode()
    header = environ.get("HTTP_AUTHORIZATION", "")
    if header[:7].lower() == "bearer ":
        return header[7:].strip().encode()
    return (parse_qs(environ.get("QUERY_STRING", "")).get("token") or [""])[0].encode()


def create_server(hub: Callable[[], Hub | None], allowed: Callable[[bytes], bool] | None) -> socketio.AsyncServer:
    """`allowed(token)` is the API's bearer check (None: no tokens configured)."""
    sio = socketio.AsyncServer(async_mode="asgi", cors_allowed_origins="*", logger=False, engineio_logger=False)
    clients: dict[str, Client] = {}

    @sio.event
    async def connect(sid: str, environ: dict[str, Any], auth: Any = None) -> bool:
        if allowed is not None and not allowed(_token(environ, auth)):
            raise socketio.exceptions.ConnectionRefusedError("unauthorized")
        current = hub()
        if current is None:
            raise socketio.exceptions.ConnectionRefusedError("starting")
        clients[sid] = current.connect(SocketIOTransport(sio, sid))
        return True

    @sio.event
    async def disconnect(sid: str, *args: Any) -> None:
        client = clients.pop(sid, None)
        current = hub()
        if client is not None and current is not None:
            await current.disconnect(client)

    @sio.on("*")
    async def any_event(event: str, sid: str, data: Any = None) -> None:
        client, current = clients.get(sid), hub()
        if client is None or current is None:
            return
        if isinstance(data, dict):
            message = {**data, "type": event}
        elif isinstance(data, str):
            # PUMP clients send `subscribe_device` with the bare id; rooms come bare too
            message = {"type": event, ("room" if "room" in event else "deviceId"): data}
        else:
            message = {"type": event}
        await current.handle(client, orjson.dumps(message))

    return sio
