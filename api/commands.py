"""Commands to devices over MQTT, with a lifecycle: queued, sent, acked, failed, expired."""

from __future__ import annotations

from types import TracebackType
from typing import Any

from psycopg_pool import AsyncConnectionPool
from starlette.routing import BaseRoute

from .config import ApiSettings
from .live import Hub
from .mqtt import MqttLink

RESULT_TOPICS: tuple[str, ...] = ()


class Commands:
    def __init__(self, settings: ApiSettings, pool: AsyncConnectionPool, mqtt: MqttLink, hub: Hub) -> None:
        self.settings, self.pool, self.mqtt, self.hub = settings, pool, mqtt, hub

    async def __aenter__(self) -> Commands:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None

    async def on_mqtt(self, topic: str, data: Any) -> None:
        return None


routes: list[BaseRoute] = []
