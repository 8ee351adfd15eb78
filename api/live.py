"""WebSocket `/ws`: dashboards subscribe, the hub relays what the bridge committed."""

from __future__ import annotations

from types import TracebackType
from typing import Any

from psycopg_pool import AsyncConnectionPool
from starlette.routing import BaseRoute

from .config import ApiSettings


class Hub:
    def __init__(self, settings: ApiSettings, pool: AsyncConnectionPool) -> None:
        self.settings = settings
        self.pool = pool
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
        return None


routes: list[BaseRoute] = []
