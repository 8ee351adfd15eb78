"""The bridge's Prometheus metrics and `/healthz`, served by a small asyncio HTTP server.

A registry per bridge (not prometheus_client's global one), so several bridges in one process
(tests) keep separate counts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

log = logging.getLogger(__name__)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.received = Counter("bridge_messages_received", "MQTT messages handed to the writer", registry=r)
        self.stored = Counter("bridge_messages_stored", "messages stored (repeats excluded)", registry=r)
        self.dead_letters = Counter("bridge_dead_letters", "messages stored in dead_letters", registry=r)
        self.batches = Counter("bridge_batches", "committed batches", registry=r)
        self.db_failures = Counter("bridge_database_failures", "batch attempts that found no database", registry=r)
        self.commit_seconds = Histogram(
            "bridge_commit_seconds",
            "time to write and commit one batch",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r,
        )
        self.pending = Gauge("bridge_pending_messages", "received, not yet committed", registry=r)
        self.lag = Gauge("bridge_lag_seconds", "age of the oldest message not yet committed", registry=r)
        self.mqtt_reconnects = Gauge("bridge_mqtt_reconnects", "reconnections to the broker", registry=r)
        self.db_reconnects = Gauge("bridge_database_reconnects", "reconnections to the database", registry=r)
        self.mqtt_connected = Gauge("bridge_mqtt_connected", "1 while connected to the broker", registry=r)


class HealthServer:
    """`GET /metrics` (Prometheus text) and `GET /healthz` (JSON; 503 while broker or database is away)."""

    def __init__(self, metrics: Metrics, health: Callable[[], dict[str, Any]], host: str, port: int) -> None:
        self._metrics = metrics
        self._health = health
        self._host, self._port = host, port
        self._server: asyncio.Server | None = None
        self.port = port

    async def __aenter__(self) -> HealthServer:
        self._server = await asyncio.start_server(self._handle, self._host, self._port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("health and metrics on http://%s:%d/healthz and /metrics", self._host, self.port)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            path = request.split(b" ", 2)[1].split(b"?", 1)[0] if b" " in request else b"/"
            if path == b"/metrics":
                status, ctype, body = 200, CONTENT_TYPE_LATEST, generate_latest(self._metrics.registry)
            elif path in (b"/healthz", b"/health"):
                health = self._health()
                status = 200 if health["status"] == "ok" else 503
                ctype, body = "application/json", orjson.dumps(health)
            else:
                status, ctype, body = 404, "text/plain", b"not found"
            head = f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}\r\nContent-Type: {ctype}\r\n"
            head += f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            writer.write(head.encode() + body)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        except Exception:  # a bad request must not take the server down
            log.exception("health request failed")
        finally:
            writer.close()


def now() -> float:
    return time.time()
