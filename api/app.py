"""The Starlette app: one lifespan composes the database pool, the MQTT link, the live hub and commands."""

from __future__ import annotations

import contextlib
import hmac
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
import socketio
from psycopg_pool import AsyncConnectionPool
from starlette.applications import Starlette
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from bridge.schema import libpq_url

from . import alerts, commands, dashboard, eie, ems, health, hes, live, openapi, pump, sio
from .config import ApiSettings
from .errors import HANDLERS, error_body
from .mqtt import MqttLink
from .responses import json_response

log = logging.getLogger(__name__)

PUBLIC_PATHS = frozenset(
    {"/api/health", "/api/v1/health", "/api/v1/health/databases", "/", "/favicon.ico", "/openapi.json"}
)
# The dashboard's assets: public like the page itself, which asks for the token.
PUBLIC_PREFIXES = ("/static/",)


def public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


@dataclass
class Services:
    settings: ApiSettings
    pool: AsyncConnectionPool
    mqtt: MqttLink
    hub: live.Hub
    commands: commands.Commands
    rollups: eie.RollupMark = field(default_factory=eie.RollupMark)


class BearerAuth:
    """When API_TOKENS is set, every request but the health checks needs `Authorization: Bearer <token>`.

    WebSocket clients may pass the token as `?token=` since browsers cannot set headers there.
    """

    def __init__(self, app: ASGIApp, tokens: tuple[str, ...]) -> None:
        self.app = app
        self.tokens = tuple(t.encode() for t in tokens)

    def allowed(self, presented: bytes) -> bool:
        # compare against every token, always, in constant time per token
        ok = False
        for token in self.tokens:
            ok |= hmac.compare_digest(presented, token)
        return ok

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            not self.tokens
            or scope["type"] not in ("http", "websocket")
            or (scope["type"] == "http" and public(scope["path"]))
        ):
            await self.app(scope, receive, send)
            return
        presented = b""
        for name, value in scope.get("headers", []):
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                presented = value[7:].strip()
        if not presented and scope["type"] == "websocket":
            from urllib.parse import parse_qs

            qs = parse_qs(scope.get("query_string", b"").decode())
            presented = (qs.get("token") or [""])[0].encode()
        if presented and self.allowed(presented):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 4401, "reason": "unauthorized"})
            return
        response = json_response(
            error_body(401, "missing or invalid bearer token"), 401, headers={"WWW-Authenticate": "Bearer"}
        )
        await response(scope, receive, send)


async def _configure(conn: psycopg.AsyncConnection[Any]) -> None:
    # Every read is a small per-device lookup over hypertables, prepared after a few runs. PostgreSQL keeps
    # re-planning those (a custom plan per call: ~1 ms, more than the execution) because the generic plan
    # looks costlier before TimescaleDB excludes chunks at run time; measured 2.8 → 1.8 ms per
    # performance query and 0.94 → 0.37 ms per current-block query (bench/README.md).
    await conn.execute("SET plan_cache_mode = force_generic_plan")


def create_app(settings: ApiSettings | None = None) -> ASGIApp:
    """The Starlette app, with Socket.IO in front of it at `/socket.io/` (both share the hub)."""
    settings = settings or ApiSettings.from_env()
    current: dict[str, live.Hub] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        pool = AsyncConnectionPool(
            libpq_url(settings.core.database_url),
            min_size=1,
            max_size=settings.db_pool_max,
            kwargs={"autocommit": True},
            configure=_configure,
            open=False,
            timeout=5,
            reconnect_timeout=0,  # keep trying while the database is down; requests answer 503 meanwhile
        )
        await pool.open(wait=False)
        link = MqttLink(
            settings.core.mqtt,
            settings.mqtt_client_id,
            settings.core.mqtt_protocol,
            extra_topics=commands.RESULT_TOPICS,
        )
        try:
            async with (
                link,
                live.Hub(settings, pool, link) as hub,
                commands.Commands(settings, pool, link, hub) as cmds,
            ):
                link.listen(hub.on_mqtt)
                link.listen(cmds.on_mqtt)
                current["hub"] = hub
                yield {"services": Services(settings, pool, link, hub, cmds)}
        finally:
            current.clear()
            await pool.close()

    routes = [
        *health.routes,
        *ems.routes,
        *eie.routes,
        *pump.routes,
        *commands.routes,
        *hes.routes,
        *alerts.routes,
        *live.routes,
        *dashboard.routes,
        *openapi.routes,
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers=HANDLERS)
    app.add_middleware(BearerAuth, tokens=settings.tokens)
    if settings.cors_origins:
        # outermost: browsers' preflight requests carry no token
        app.add_middleware(
            CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["*"], allow_headers=["*"]
        )
    check = BearerAuth(app, settings.tokens).allowed if settings.tokens else None
    sio_server = sio.create_server(lambda: current.get("hub"), check)
    return socketio.ASGIApp(sio_server, other_asgi_app=app, socketio_path="socket.io")
