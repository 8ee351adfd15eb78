"""The bridge: MQTT in, batches into the database, acknowledgements after commit."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import UTC, datetime
from typing import Any

from . import alerts, committed, rollups
from .adapters import Adapters, Context
from .config import Settings
from .db import Database
from .errors import DatabaseUnavailable
from .metrics import HealthServer, Metrics
from .mqtt import MqttIngress
from .telemetry import Decoded, Decoder
from .writer import Writer, WriteResult

log = logging.getLogger(__name__)

SWEEP_EVERY_S = 5.0


class Bridge:
    """Runs until `stop` is set; then flushes what it holds, acknowledges it, and disconnects."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.ready = asyncio.Event()
        self.health_port: int | None = None
        self._decoder = Decoder(
            settings.site_timezone,
            max_future=settings.max_future_skew,
            max_bytes=settings.max_payload_bytes,
            adapters=adapters_for(settings),
        )
        self._ingress: MqttIngress | None = None
        self._db: Database | None = None
        self._inflight_since: datetime | None = None
        self._db_ok = True
        self._last_commit: float | None = None
        self._engines = [alerts.AlertEngine(shared=bool(settings.shared_group)) for _ in range(settings.writers)]
        self._alerts = self._engines[0]

    async def run(self, stop: asyncio.Event) -> None:
        async with contextlib.AsyncExitStack() as stack:
            s = self.settings
            shared = bool(s.shared_group)
            # several writers, each with its own connection and its own share of the devices: while one
            # waits for the database, another runs its Python (the process is one core's worth)
            dbs = [await stack.enter_async_context(Database(s.database_url)) for _ in range(s.writers)]
            writers = [
                Writer(db, shared=shared, alerts=engine, offline_after=s.offline_after)
                for db, engine in zip(dbs, self._engines, strict=True)
            ]
            db = dbs[0]
            if s.rollup_every > 0:  # hourly rollups (bridge/rollups.py) on a connection of their own
                await stack.enter_async_context(rollups.Roller(s.database_url, s.rollup_every))
            ingress = await stack.enter_async_context(MqttIngress(s, self._decoder))
            self._db, self._ingress = db, ingress
            if s.health_port is not None:
                server = HealthServer(self.metrics, self.health, s.health_host, s.health_port)
                await stack.enter_async_context(server)
                self.health_port = server.port
            self.ready.set()
            next_sweep = time.monotonic()
            while not stop.is_set():
                batch = await ingress.next_batch(timeout=0.5)
                if batch:
                    result = await self._store(writers, batch, stop)
                    if result is None:
                        break  # stopping while the database is away: the broker keeps the rest
                    ingress.ack(batch)
                    announce(ingress, batch, result)
                self._observe()
                if time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + SWEEP_EVERY_S
                    await self._sweep(db, ingress)
            # shutdown: read nothing more, flush what we hold, then let the context managers disconnect
            ingress.pause()
            while ingress.pending():
                batch = await ingress.next_batch(timeout=0)
                result = await self._store(writers, batch, None) if batch else None
                if result is None:
                    break
                ingress.ack(batch)
                announce(ingress, batch, result)

    def health(self) -> dict[str, Any]:
        ingress, db = self._ingress, self._db
        mqtt_ok = ingress is not None and ingress.connected
        ok = mqtt_ok and self._db_ok
        self._observe()
        return {
            "status": "ok" if ok else "degraded",
            "mqtt": {"connected": mqtt_ok, "protocol": "5" if ingress and ingress.protocol == 5 else "3.1.1"},
            "database": {"ok": self._db_ok, "reconnects": db.reconnects if db else 0},
            "pending": ingress.pending() if ingress else 0,
            "lagSeconds": self.metrics.lag._value.get(),
            "lastCommitAgoSeconds": None
            if self._last_commit is None
            else round(time.monotonic() - self._last_commit, 3),
        }

    def _observe(self) -> None:
        ingress = self._ingress
        if ingress is None:
            return
        pending = ingress.pending()
        self.metrics.pending.set(pending + (1 if self._inflight_since else 0))
        oldest = self._inflight_since or ingress.oldest()
        self.metrics.lag.set((datetime.now(UTC) - oldest).total_seconds() if oldest else 0.0)
        self.metrics.mqtt_reconnects.set(ingress.reconnects)
        self.metrics.mqtt_connected.set(1 if ingress.connected else 0)
        if self._db is not None:
            self.metrics.db_reconnects.set(self._db.reconnects)

    async def _store(
        self, writers: list[Writer], batch: list[Decoded], stop: asyncio.Event | None
    ) -> WriteResult | None:
        """Store a batch, each device's messages by the same writer (in order); all writers at once."""
        self._inflight_since = min(item.received_at for item in batch)
        try:
            if len(writers) == 1:
                return await self._store_with_retry(writers[0], batch, stop)
            parts: list[list[Decoded]] = [[] for _ in writers]
            n = len(writers)
            for item in batch:
                parts[hash(item.device_id) % n].append(item)
            results = await asyncio.gather(
                *(self._store_with_retry(w, part, stop) for w, part in zip(writers, parts, strict=True) if part)
            )
            total = WriteResult()
            for result in results:
                if result is None:
                    return None  # stopping: what another writer committed is redelivered and absorbed
                total.add(result)
            return total
        finally:
            self._inflight_since = None

    async def _store_with_retry(
        self, writer: Writer, batch: list[Decoded], stop: asyncio.Event | None
    ) -> WriteResult | None:
        delay = 0.2
        while True:
            started = time.perf_counter()
            try:
                result = await writer.write(batch)
            except DatabaseUnavailable as exc:
                self._db_ok = False
                self.metrics.db_failures.inc()
                self._observe()
                log.warning("database unavailable (%s); retrying the batch of %d in %.1f s", exc, len(batch), delay)
                if stop is None or stop.is_set():
                    return None
                try:
                    await asyncio.wait_for(stop.wait(), delay)
                    return None
                except TimeoutError:
                    delay = min(delay * 2, 5.0)
                    continue
            self._db_ok = True
            self._last_commit = time.monotonic()
            m = self.metrics
            m.commit_seconds.observe(time.perf_counter() - started)
            m.batches.inc()
            m.received.inc(result.received)
            m.stored.inc(result.stored)
            m.dead_letters.inc(result.dead_letters)
            return result

    async def _sweep(self, db: Database, ingress: MqttIngress) -> None:
        """Devices silent past the timeout go offline (their will covers crashes the broker noticed)."""
        try:
            conn = await db.connection()
            async with conn.transaction(), conn.cursor() as cur:
                await cur.execute(
                    "UPDATE devices SET status = 'offline', status_changed_at = now() "
                    "WHERE status = 'online' AND last_seen < now() - make_interval(secs => %s) "
                    "RETURNING device_id, kind",
                    (self.settings.offline_after,),
                )
                gone = await cur.fetchall()
                changes = [(g[0], g[1], "offline") for g in gone]
                raised = await self._alerts.sweep(cur, changes)  # device_offline, in the same transaction
            self._alerts.commit()
            self._db_ok = True
            if gone:
                log.info("offline after %.0f s of silence: %s", self.settings.offline_after, [g[0] for g in gone])
            note = committed.payload([], changes, raised)
            if note:
                ingress.publish(committed.TOPIC, note)
            alerts.publish(ingress, raised)
        except Exception as exc:  # a failed sweep is retried at the next one
            log.warning("offline sweep failed: %s", exc)


def adapters_for(settings: Settings) -> Adapters | None:
    """The configured firmware adapters (ADAPTERS), or None: the native topics only."""
    if not settings.adapters:
        return None
    ctx = Context(settings.site_timezone, settings.max_future_skew, settings.max_payload_bytes, settings.shelly_rpc_src)
    return Adapters(settings.adapters, ctx)


def announce(ingress: MqttIngress, batch: list[Decoded], result: WriteResult) -> None:
    """Tell live views what was just committed; losing this QoS 0 note loses no data."""
    try:
        note = committed.payload(batch, result.status_changes, result.alerts)
    except Exception:  # never let an announcement stop the bridge
        log.exception("building the committed note failed")
        return
    if note:
        ingress.publish(committed.TOPIC, note)
    alerts.publish(ingress, result.alerts)
