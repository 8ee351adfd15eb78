"""The bridge: MQTT in, batches into the database, acknowledgements after commit."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from . import committed
from .config import Settings
from .db import Database
from .errors import DatabaseUnavailable
from .mqtt import MqttIngress
from .telemetry import Decoded, Decoder
from .writer import Writer, WriteResult

log = logging.getLogger(__name__)

SWEEP_EVERY_S = 5.0


@dataclass
class Stats:
    received: int = 0
    stored: int = 0
    dead_letters: int = 0
    batches: int = 0
    db_failures: int = 0
    last_commit_s: float = 0.0


class Bridge:
    """Runs until `stop` is set; then flushes what it holds, acknowledges it, and disconnects."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stats = Stats()
        self.ready = asyncio.Event()
        self._decoder = Decoder(
            settings.site_timezone, max_future=settings.max_future_skew, max_bytes=settings.max_payload_bytes
        )

    async def run(self, stop: asyncio.Event) -> None:
        async with Database(self.settings.database_url) as db, MqttIngress(self.settings, self._decoder) as ingress:
            writer = Writer(db, shared=bool(self.settings.shared_group))
            self.ready.set()
            next_sweep = time.monotonic()
            while not stop.is_set():
                batch = await ingress.next_batch(timeout=0.5)
                if batch:
                    result = await self._store(writer, batch, stop)
                    if result is None:
                        break  # stopping while the database is away: the broker keeps the rest
                    ingress.ack(batch)
                    announce(ingress, batch, result)
                if time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + SWEEP_EVERY_S
                    await self._sweep(db, ingress)
            # shutdown: flush what paho already handed us, then let the context managers disconnect
            while ingress.pending():
                batch = await ingress.next_batch(timeout=0)
                result = await self._store(writer, batch, None) if batch else None
                if result is None:
                    break
                ingress.ack(batch)
                announce(ingress, batch, result)

    async def _store(self, writer: Writer, batch: list[Decoded], stop: asyncio.Event | None) -> WriteResult | None:
        delay = 0.2
        while True:
            started = time.perf_counter()
            try:
                result = await writer.write(batch)
            except DatabaseUnavailable as exc:
                self.stats.db_failures += 1
                log.warning("database unavailable (%s); retrying the batch of %d in %.1f s", exc, len(batch), delay)
                if stop is None or stop.is_set():
                    return None
                try:
                    await asyncio.wait_for(stop.wait(), delay)
                    return None
                except TimeoutError:
                    delay = min(delay * 2, 10.0)
                    continue
            self.stats.last_commit_s = time.perf_counter() - started
            self.stats.batches += 1
            self.stats.received += result.received
            self.stats.stored += result.stored
            self.stats.dead_letters += result.dead_letters
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
            if gone:
                log.info("offline after %.0f s of silence: %s", self.settings.offline_after, [g[0] for g in gone])
                note = committed.payload([], [(g[0], g[1], "offline") for g in gone])
                if note:
                    ingress.publish(committed.TOPIC, note)
        except Exception as exc:  # a failed sweep is retried at the next one
            log.warning("offline sweep failed: %s", exc)


def announce(ingress: MqttIngress, batch: list[Decoded], result: WriteResult) -> None:
    """Tell live views what was just committed; losing this QoS 0 note loses no data."""
    try:
        note = committed.payload(batch, result.status_changes)
    except Exception:  # never let an announcement stop the bridge
        log.exception("building the committed note failed")
        return
    if note:
        ingress.publish(committed.TOPIC, note)
