"""WebSocket `/ws`: dashboards subscribe, the hub relays what the bridge committed."""

from __future__ import annotations

from types import TracebackType
from typing import Any

from psycopg_pool import AsyncConnectionPool
from starlette.routing import BaseRoute

from .config import ApiSettings
from .mqtt import MqttLink


class Hub:
    """Interface used by the rest of the API (commands, app): `on_mqtt`, `push_device`, `push_room`,
    `push_dashboards`, `count`."""

    def __init__(self, settings: ApiSettings, pool: AsyncConnectionPool, mqtt: MqttLink) -> None:
        self.settings = settings
        self.pool = pool
        self.mqtt = mqtt
        self.clients: set[Any] = set()

    @property
    def count(self) -> int:
        return len(self.clients)

    async def __aenter__(self) -> Hub:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None

    async def on_mqtt(self, topic: str, data: Any) -> None:
        return None

    async def push_device(self, device_id: str, message: dict[str, Any]) -> None:
        """To clients that subscribed to the device (`subscribe_device`, room `device-<id>`)."""
        return None

    async def push_room(self, room: str, message: dict[str, Any]) -> None:
        """To clients in a room (`join-room`, e.g. `meter-<id>`)."""
        return None

    async def push_dashboards(self, message: dict[str, Any]) -> None:
        """To clients that sent `dashboard:register`."""
        return None


routes: list[BaseRoute] = []
