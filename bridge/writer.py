"""Writes decoded messages in batches: one transaction and one statement per table per batch.

Every statement takes whole columns as arrays (`INSERT … SELECT FROM unnest(…)`), so a batch costs a
fixed number of round trips whatever its size. Repeats are absorbed by primary keys (ON CONFLICT).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from typing import Any, NamedTuple

import orjson
import psycopg
from psycopg import errors as pg_errors

from . import energy, rollups
from .alerts import AlertEngine
from .arrays import Floats, Stamps, Texts, columns
from .db import Database
from .errors import DatabaseUnavailable
from .telemetry import (
    CommandResult,
    DeadLetter,
    Decoded,
    Message,
    MeterReading,
    ObisReading,
    Presence,
    PumpEvent,
    PumpStatus,
    Stored,
    VehicleReading,
)

log = logging.getLogger(__name__)


@dataclass(slots=True)
class WriteResult:
    received: int = 0
    stored: int = 0
    dead_letters: int = 0
    status_changes: list[tuple[str, str, str]] = field(default_factory=list)  # (device_id, kind, status)
    alerts: list[dict[str, Any]] = field(default_factory=list)  # raised/resolved in this batch (bridge.alerts)

    def add(self, other: WriteResult) -> None:
        self.received += other.received
        self.stored += other.stored
        self.dead_letters += other.dead_letters
        self.status_changes.extend(other.status_changes)
        self.alerts.extend(other.alerts)


def _cols(rows: Sequence[tuple[Any, ...]], n: int) -> list[list[Any]]:
    return [list(c) for c in zip(*rows, strict=True)] if rows else [[] for _ in range(n)]


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


# A meter's energy context, read before the batch's readings are inserted (so what it finds is stored by
# others). Usually every new reading is newer than the meter's newest stored one: then that reading (from
# `meter_latest`, one key lookup) and, for a register, the one before it (whether that had a register
# decides how the newest was counted) are all there is to know ('l', 'p'). Otherwise, or when the newest
# is older than a day (retention may have dropped it from the readings, which the long way would not
# see) or unknown: the two readings before the batch, those within its range, and two after ('b', 'm',
# 'a'). `req` names, per meter: the batch's range (lo, hi), the newest stored reading (ts, register) and
# whether the batch follows it (newer).
_NEIGHBOURS = """
SELECT 'p', x.* FROM req CROSS JOIN LATERAL (
    SELECT meter_id, ts, power_kw, kwh_consumed_ac, energy_total_kwh FROM meter_readings m
    WHERE m.meter_id = req.meter_id AND m.ts < req.ts ORDER BY m.ts DESC LIMIT 1) x
WHERE req.newer AND req.energy_total_kwh IS NOT NULL
UNION ALL
SELECT 'b', x.* FROM req CROSS JOIN LATERAL (
    SELECT meter_id, ts, power_kw, kwh_consumed_ac, energy_total_kwh FROM meter_readings m
    WHERE m.meter_id = req.meter_id AND m.ts < req.lo ORDER BY m.ts DESC LIMIT 2) x
WHERE NOT req.newer
UNION ALL
SELECT 'm', x.* FROM req CROSS JOIN LATERAL (
    SELECT meter_id, ts, power_kw, kwh_consumed_ac, energy_total_kwh FROM meter_readings m
    WHERE m.meter_id = req.meter_id AND m.ts BETWEEN req.lo AND req.hi) x
WHERE NOT req.newer
UNION ALL
SELECT 'a', x.* FROM req CROSS JOIN LATERAL (
    SELECT meter_id, ts, power_kw, kwh_consumed_ac, energy_total_kwh FROM meter_readings m
    WHERE m.meter_id = req.meter_id AND m.ts > req.hi ORDER BY m.ts LIMIT 2) x
WHERE NOT req.newer
"""
_ENERGY_CONTEXT = f"""
WITH req AS MATERIALIZED (
    SELECT r.meter_id, r.lo, r.hi, l.ts, l.power_kw, l.kwh_consumed_ac, l.energy_total_kwh,
           coalesce(l.ts < r.lo AND l.ts > r.lo - interval '1 day', false) AS newer
    FROM unnest(%b::text[], %b::timestamptz[], %b::timestamptz[]) AS r(meter_id, lo, hi)
    LEFT JOIN meter_latest l USING (meter_id))
SELECT 'l', meter_id, ts, power_kw, kwh_consumed_ac, energy_total_kwh FROM req WHERE newer
UNION ALL{_NEIGHBOURS}"""  # noqa: S608
# shared mode: the newest stored readings came back from the readings' insert (`_insert_meters`); only the
# neighbours are asked for
_SHARED_NEIGHBOURS = f"""
WITH req AS MATERIALIZED (
    SELECT *, ts IS NOT NULL AS newer
    FROM unnest(%b::text[], %b::timestamptz[], %b::timestamptz[], %b::timestamptz[], %b::float8[])
         AS r(meter_id, lo, hi, ts, energy_total_kwh)){_NEIGHBOURS}"""  # noqa: S608


# meter_latest keeps the newest reading whichever write comes first. An update keeps what the row held
# before in `prev_*` (read back by shared bridges: `_insert_meters`)
_LATEST_UPSERT = """
INSERT INTO meter_latest AS l (meter_id, ts, power_kw, kwh_consumed_ac, energy_total_kwh, voltage, current,
                               frequency, power_factor)
SELECT DISTINCT ON (meter_id) * FROM ins ORDER BY meter_id, ts DESC
ON CONFLICT (meter_id) DO UPDATE SET
    ts = EXCLUDED.ts, power_kw = EXCLUDED.power_kw, kwh_consumed_ac = EXCLUDED.kwh_consumed_ac,
    energy_total_kwh = EXCLUDED.energy_total_kwh, voltage = EXCLUDED.voltage, current = EXCLUDED.current,
    frequency = EXCLUDED.frequency, power_factor = EXCLUDED.power_factor, updated_at = now(),
    prev_ts = l.ts, prev_power_kw = l.power_kw, prev_kwh_consumed_ac = l.kwh_consumed_ac,
    prev_energy_total_kwh = l.energy_total_kwh
WHERE EXCLUDED.ts > l.ts"""


def _insert_meters(shared: bool) -> str:
    """The readings, meter_latest from the newest of those the insert stored (a repeat is never newer than
    what its first storing put there), and what the insert stored: a count, and the keys when some were
    repeats. One statement, one round trip.

    Shared mode: the upsert takes the meters that got new readings, in one order (no deadlocks). Every row
    is locked until the commit, updated or not (ON CONFLICT DO UPDATE locks what its WHERE skips), so this
    is the meters' turn: whoever takes a meter later sees what went earlier. `prev_*` comes back for each
    updated row, the newest reading as the lock found it, one row each after the row of what was stored;
    a meter not returned held a reading at least as new (late data)."""
    returning = "\n    RETURNING meter_id, prev_ts, prev_power_kw, prev_kwh_consumed_ac, prev_energy_total_kwh"
    extra = ", NULL::text, NULL::timestamptz, NULL::float8, NULL::float8, NULL::float8"
    taken = (
        "\nUNION ALL\nSELECT NULL, NULL, NULL, meter_id, prev_ts, prev_power_kw, prev_kwh_consumed_ac, "
        "prev_energy_total_kwh FROM latest"
    )
    return f"""
WITH ins AS (
    INSERT INTO meter_readings (meter_id, ts, power_kw, kwh_consumed_ac, energy_total_kwh, voltage, current,
                                frequency, power_factor)
    SELECT * FROM unnest(%b::text[], %b::timestamptz[], %b::float8[], %b::float8[], %b::float8[], %b::float8[],
                         %b::float8[], %b::float8[], %b::float8[])
    ON CONFLICT DO NOTHING
    RETURNING meter_id, ts, power_kw, kwh_consumed_ac, energy_total_kwh, voltage, current, frequency,
              power_factor),
latest AS ({_LATEST_UPSERT}{returning if shared else ""})
SELECT count(*)::int4,
       CASE WHEN count(*) < %b::int4 THEN array_agg(meter_id) END,
       CASE WHEN count(*) < %b::int4 THEN array_agg(ts) END{extra if shared else ""}
FROM ins{taken if shared else ""}
"""  # noqa: S608


_INSERT_ONE, _INSERT_SHARED = _insert_meters(False), _insert_meters(True)


_MATCH_COMMANDS = """
WITH v AS (SELECT * FROM unnest(%b::int[], %b::text[], %b::text[], %b::text[], %b::text[])
           AS v(i, device_id, match, status, result)),
pick AS (
    SELECT DISTINCT ON (p.command_id) p.command_id, v.i, v.status, v.result
    FROM v CROSS JOIN LATERAL (
        SELECT c.command_id FROM commands c
        WHERE c.device_id = v.device_id AND c.status IN ('queued', 'sent') AND c.payload @> v.match::jsonb
        ORDER BY c.created_at DESC LIMIT 1) p
    ORDER BY p.command_id, v.i)
UPDATE commands c SET status = pick.status, updated_at = now(),
    result = pick.result::jsonb || jsonb_build_object('commandId', c.command_id)
FROM pick WHERE c.command_id = pick.command_id AND c.status IN ('queued', 'sent')
RETURNING pick.i, c.command_id
"""


class _Context(NamedTuple):
    """What `_ENERGY_CONTEXT` found, per meter."""

    newest: dict[str, energy.Point]  # the newest stored reading, when the batch follows it
    before_newest: dict[str, energy.Point]  # the one before that, for a register
    found: dict[str, dict[str, list[energy.Point]]]  # otherwise: 'b'efore, 'm'iddle, 'a'fter the batch


_METER_KINDS = "tsfffffff"
_COUNTERS = ["messages_received", "messages_stored", "dead_letters"]


class Writer:
    """Stores batches. `shared=True` (several bridges on one shared subscription) trusts no cache."""

    def __init__(
        self, db: Database, *, shared: bool = False, alerts: AlertEngine | None = None, offline_after: float = 300.0
    ) -> None:
        self._db = db
        self._shared = shared
        self._last: dict[str, energy.Last] = {}
        self._written: dict[str, tuple[str, float]] = {}  # device -> (status, when) of its last upsert
        self._rewrite_after = min(5.0, offline_after / 2)
        self._staged_writes: dict[str, tuple[str, float]] = {}
        self._alerts = alerts

    async def write(self, items: Sequence[Decoded]) -> WriteResult:
        """Store a batch in one transaction; a message the database refuses is dead-lettered alone.

        Raises DatabaseUnavailable when the database cannot be reached: nothing of the batch is stored
        and the caller retries it whole.
        """
        conn = await self._db.connection()
        try:
            return await self._transaction_retrying(conn, items)
        except psycopg.OperationalError as exc:
            raise DatabaseUnavailable(f"database lost while writing a batch: {exc}") from exc
        except DatabaseUnavailable:
            raise
        except Exception as exc:  # refused by the database, or a bug of ours: isolate the message at fault
            if len(items) == 1 and isinstance(items[0], DeadLetter):
                raise
            log.warning("batch of %d failed (%s); storing its messages one by one", len(items), exc)
        total = WriteResult()
        for item in items:
            try:
                total.add(await self._transaction_retrying(conn, [item]))
            except psycopg.OperationalError as exc:
                raise DatabaseUnavailable(f"database lost while writing a batch: {exc}") from exc
            except DatabaseUnavailable:
                raise
            except Exception as exc:
                if isinstance(item, DeadLetter):
                    raise
                if isinstance(exc, psycopg.Error):
                    reason = f"refused by the database: {type(exc).__name__}: {exc}".strip()
                else:
                    log.exception("storing a message from %s failed", item.topic)
                    reason = f"internal error while storing: {type(exc).__name__}: {exc}".strip()
                letter = DeadLetter(item.topic, item.payload, reason, item.received_at, device_id=item.device_id)
                total.add(await self._transaction(conn, [letter]))
        return total

    async def _transaction_retrying(self, conn: psycopg.AsyncConnection, items: Sequence[Decoded]) -> WriteResult:
        """A deadlock or serialization failure says nothing about the data: try the same batch again."""
        for attempt in range(4):
            try:
                return await self._transaction(conn, items)
            except pg_errors.TransactionRollback as exc:
                if attempt == 3:
                    raise DatabaseUnavailable(f"batch kept failing to commit: {exc}") from exc
                log.info("retrying a batch after %s", type(exc).__name__)
        raise AssertionError("unreachable")

    async def _transaction(self, conn: psycopg.AsyncConnection, items: Sequence[Decoded]) -> WriteResult:
        # pipeline mode: a statement whose result is not read does not wait for it (BEGIN, the readers'
        # lock, the pieces, the counters, COMMIT ride with the next round trip): with shared bridges the
        # meters' row locks are held for fewer waits on the event loop
        async with conn.pipeline(), conn.transaction(), conn.cursor() as cur:
            self._staged_writes = {}
            result, cache = await self._store(cur, items)
        if not self._shared:  # shared bridges keep no cache: another bridge may have stored newer readings
            self._last.update(cache)  # only once committed
        self._written.update(self._staged_writes)
        if self._alerts is not None:
            self._alerts.commit()
        return result

    def _recently_written(self, device_id: str, status: str, now: float) -> bool:
        last = self._written.get(device_id)
        return last is not None and last[0] == status and now - last[1] < self._rewrite_after

    async def _store(
        self, cur: psycopg.AsyncCursor[Any], items: Sequence[Decoded]
    ) -> tuple[WriteResult, dict[str, energy.Last]]:
        result = WriteResult(received=len(items))
        closing = await rollups.begin(cur)  # rows before it go into hours already rolled up
        meters: list[MeterReading] = []
        vehicles: list[VehicleReading] = []
        pumps: list[PumpStatus] = []
        obis: list[ObisReading] = []
        events: list[PumpEvent] = []
        commands: list[CommandResult] = []
        letters: list[DeadLetter] = []
        # device -> (kind, last seen, status, adapter address); messages are in arrival order, so the last word wins
        devices: dict[str, tuple[str, datetime, str, str | None]] = {}
        for item in items:
            if isinstance(item, DeadLetter):
                letters.append(item)
                continue
            status = "online"
            for rec in item.records:
                if isinstance(rec, MeterReading):
                    meters.append(rec)
                elif isinstance(rec, VehicleReading):
                    vehicles.append(rec)
                elif isinstance(rec, PumpStatus):
                    pumps.append(rec)
                elif isinstance(rec, ObisReading):
                    obis.append(rec)
                elif isinstance(rec, PumpEvent):
                    events.append(rec)
                elif isinstance(rec, CommandResult):
                    commands.append(rec)
                elif isinstance(rec, Presence):
                    status = "online" if rec.online else "offline"
            address = _json(item.address) if item.address is not None else None
            devices[item.device_id] = (item.kind, item.received_at, status, address)

        now = time.monotonic()
        # last_seen to the second is enough: a device written moments ago with the same status is not
        # rewritten (thousands of row updates per batch otherwise)
        fresh = {d: v for d, v in devices.items() if v[3] is not None or not self._recently_written(d, v[2], now)}
        device_rows: psycopg.AsyncCursor[Any] | None = None
        if fresh:
            # its own cursor, read at the end: the statements after it go out without waiting for it
            device_rows = cur.connection.cursor()
            await self._devices(device_rows, fresh)
            self._staged_writes = {d: (v[2], now) for d, v in fresh.items()}
        stored = Stored()
        new_keys = stored.keys
        asked: tuple[psycopg.AsyncCursor[Any], set[str]] | None = None
        then = None
        cache: dict[str, energy.Last] = {}
        late_meters: list[tuple[str, datetime]] = []
        late_vehicles: list[tuple[str, datetime]] = []
        if meters:
            ctx: _Context | None
            # the readings as points per meter, before the insert: with shared bridges whatever runs after
            # it runs while the batch holds its meters' turn (`_insert_meters`)
            grouped = _grouped(meters)
            if self._shared:
                # several bridges share the subscription, so a meter's readings are split between them:
                # each batch's insert takes its meters in turn (`_insert_meters`) and their energy is
                # computed with what the others committed before it in view. Only meters with a new
                # reading: a repeat's pieces were stored with it
                if self._alerts is not None:
                    # the meters' active alerts, read right after their turn is taken (another bridge may
                    # have raised what this batch resolves), and asked for in the same round trip
                    turn = {i.device_id for i in items if isinstance(i, Message) and _has_meter_reading(i)}
                    asked = (cur.connection.cursor(), turn)
                    then = partial(AlertEngine.ask_active, *asked)
                stored, taken = await self._meters(cur, meters, shared=True, then=then)
                if not stored.all_meters:
                    fresh_ids = stored.meter_ids()
                    grouped = {m: points for m, points in grouped.items() if m in fresh_ids}
                ctx = await self._shared_context(cur, grouped, stored, taken)
            else:
                ctx = await self._energy_context(cur, grouped)  # before the insert: what others stored
                stored, _ = await self._meters(cur, meters)
            outcomes = self._energy_outcomes(grouped, ctx)
            new_keys = stored.keys
            cache, late_meters = await self._energy(cur, outcomes, closing)
        if vehicles:
            new_keys |= await self._vehicles(cur, vehicles)
            late_vehicles = [(r.vehicle_id, rollups.hour_of(r.ts)) for r in vehicles if r.ts < closing]
        if late_meters or late_vehicles:  # rows in hours already rolled up: sum those hours again
            await rollups.recompute(cur, late_vehicles, late_meters)
        if pumps:
            new_keys |= await self._pumps(cur, pumps)
        if obis:
            new_keys |= await self._obis(cur, obis)
        if events:
            new_keys |= await self._events(cur, events)
        if commands:
            await self._commands(cur, commands)
        if letters:
            await self._dead_letters(cur, letters)
        for item in items:
            if isinstance(item, Message) and _is_new(item, stored):
                result.stored += 1
        result.dead_letters = len(letters)
        if device_rows is not None:
            result.status_changes = [(r[0], r[1], r[2]) for r in await device_rows.fetchall() if r[3] != r[2]]
            await device_rows.close()
        if self._alerts is not None:  # alerts: judged on what this batch stored, in its transaction
            result.alerts = await self._alerts.evaluate(cur, items, stored, result.status_changes, asked)
            if asked is not None:
                await asked[0].close()
        # each transaction adds to its own shard of the counters (its backend's), so writers do not wait
        # at one row for each other's commits (migration 0006)
        await cur.execute(
            "INSERT INTO counters AS c (name, shard, value) SELECT name, pg_backend_pid() %% 64, n "
            "FROM unnest(%b::text[], %b::bigint[]) AS v(name, n) ORDER BY name "
            "ON CONFLICT (name, shard) DO UPDATE SET value = c.value + EXCLUDED.value",
            (_COUNTERS, [result.received, result.stored, result.dead_letters]),
        )
        return result, cache

    async def _devices(
        self, cur: psycopg.AsyncCursor[Any], devices: dict[str, tuple[str, datetime, str, str | None]]
    ) -> None:
        """Upsert the batch's devices; `cur` then holds (device, kind, status, status before) per device."""
        ids = Texts(devices)
        kinds, seen, status, adapter = columns(devices.values(), "tstt")
        # an adapted device's command address (bridge.adapters) is merged into meta.adapter, beside
        # whatever else meta holds
        await cur.execute(
            """
            WITH v AS (SELECT * FROM unnest(%b::text[], %b::text[], %b::timestamptz[], %b::text[], %b::text[])
                       AS v(device_id, kind, seen, status, adapter)),
            old AS (SELECT d.device_id, d.status FROM devices d JOIN v USING (device_id)),
            up AS (INSERT INTO devices AS d (device_id, kind, status, first_seen, last_seen, status_changed_at, meta)
            SELECT device_id, kind, status, seen, seen, seen,
                   CASE WHEN adapter IS NULL THEN '{}'::jsonb ELSE jsonb_build_object('adapter', adapter::jsonb) END
            FROM v
            ORDER BY device_id  -- rows locked in one order: bridges sharing a subscription cannot deadlock here
            ON CONFLICT (device_id) DO UPDATE SET
                last_seen = greatest(d.last_seen, EXCLUDED.last_seen),
                status = EXCLUDED.status,
                status_changed_at = CASE WHEN d.status <> EXCLUDED.status
                                         THEN EXCLUDED.status_changed_at ELSE d.status_changed_at END,
                meta = CASE WHEN EXCLUDED.meta ? 'adapter'
                            THEN d.meta || jsonb_build_object(
                                'adapter', coalesce(d.meta->'adapter', '{}'::jsonb) || (EXCLUDED.meta->'adapter'))
                            ELSE d.meta END
            RETURNING d.device_id, d.kind, d.status)
            -- a hash join, not a subquery per returned row (that was quadratic in the batch)
            SELECT up.device_id, up.kind, up.status, old.status FROM up LEFT JOIN old USING (device_id)
            """,
            (ids, kinds, seen, status, adapter),
        )

    async def _meters(
        self,
        cur: psycopg.AsyncCursor[Any],
        rows: list[MeterReading],
        shared: bool = False,
        then: Callable[[], Awaitable[None]] | None = None,
    ) -> tuple[Stored, list[tuple[Any, ...]]]:
        """Store the readings; (what was stored, in shared mode the rows `_insert_meters` hands back).
        `then` sends another statement behind them, before their result is read."""
        await cur.execute(
            _INSERT_SHARED if shared else _INSERT_ONE,
            (*columns([_meter_row(r) for r in rows], _METER_KINDS), len(rows), len(rows)),
            binary=True,  # timestamps come back parsed in C, not from text
        )
        if then is not None:
            await then()
        # the keys only when some reading was a repeat: the usual batch stores all of them
        result = await cur.fetchall()
        # one row with the count (shared mode: and one per meter taken, count NULL), in whatever order
        count, ids, stamps = next(row[:3] for row in result if row[0] is not None)
        taken = [row[3:] for row in result if row[0] is None]
        if count == len(rows):
            return Stored(all_meters=True, meters=rows), taken
        return Stored({("meter", m, t) for m, t in zip(ids or (), stamps or (), strict=True)}), taken

    async def _energy_context(
        self, cur: psycopg.AsyncCursor[Any], grouped: dict[str, list[energy.Point]]
    ) -> _Context | None:
        """The stored neighbours of the meters the cache cannot serve (None: it serves them all), read before
        the readings are inserted."""
        cached = self._last
        wanted = []
        for meter_id, points in grouped.items():
            last = cached.get(meter_id)
            if last is None or points[0].ts <= last.point.ts:
                wanted.append(meter_id)
        if not wanted:
            return None
        await cur.execute(
            _ENERGY_CONTEXT,
            (Texts(wanted), Stamps([grouped[m][0].ts for m in wanted]), Stamps([grouped[m][-1].ts for m in wanted])),
            binary=True,  # timestamps come back parsed in C, not from text
        )
        ctx = _Context({}, {}, defaultdict(lambda: defaultdict(list)))
        _add_context(ctx, await cur.fetchall())
        return ctx

    async def _shared_context(
        self,
        cur: psycopg.AsyncCursor[Any],
        grouped: dict[str, list[energy.Point]],
        inserted: Stored,
        taken: list[tuple[Any, ...]],
    ) -> _Context:
        """Shared mode: the energy context, from what the readings' insert found in meter_latest (`taken`:
        the usual batch's whole context) and, for the other meters (late data, first sight) and a
        register's predecessor, from the readings, looked up after the insert (`inserted`: the batch's own
        new readings, set aside: not stored ones whose pieces must be replaced)."""
        ctx = _Context({}, {}, defaultdict(lambda: defaultdict(list)))
        Point = energy.Point
        day = timedelta(days=1)
        for meter_id, ts, power, interval, register in taken:
            # the batch follows the newest stored reading (as `_ENERGY_CONTEXT` decides `newer`)
            if ts is not None and (lo := grouped[meter_id][0].ts) - day < ts < lo:
                ctx.newest[meter_id] = Point(ts, power, interval, register)
        ask = [m for m in grouped if m not in ctx.newest or ctx.newest[m].register is not None]
        if ask:
            latest = [ctx.newest.get(m) for m in ask]
            await cur.execute(
                _SHARED_NEIGHBOURS,
                (
                    Texts(ask),
                    Stamps([grouped[m][0].ts for m in ask]),
                    Stamps([grouped[m][-1].ts for m in ask]),
                    Stamps([p.ts if p else None for p in latest]),
                    Floats([p.register if p else None for p in latest]),
                ),
                binary=True,
            )
            spans = {m: {p.ts for p in grouped[m]} for m in ask if m not in ctx.newest}
            _add_context(ctx, await cur.fetchall(), spans, inserted)
        return ctx

    def _energy_outcomes(
        self, grouped: dict[str, list[energy.Point]], ctx: _Context | None
    ) -> dict[str, energy.Outcome]:
        """Energy pieces of the readings, per meter: after the cached newest reading, or from `ctx`."""
        outcomes: dict[str, energy.Outcome] = {}
        cached = self._last  # empty with shared bridges (`_transaction` keeps none)
        for meter_id, ordered in grouped.items():
            last = cached.get(meter_id)
            if last is not None and ordered[0].ts > last.point.ts:
                outcomes[meter_id] = energy.extend(last, ordered)
                continue
            assert ctx is not None, "a meter the cache cannot serve was not looked up"
            latest = ctx.newest.get(meter_id)
            if latest is not None:  # the batch follows the newest stored reading
                method = energy.method_of(ctx.before_newest.get(meter_id), latest)
                outcomes[meter_id] = energy.extend(energy.Last(latest, method), ordered)
                continue
            found = ctx.found[meter_id]
            before = sorted(found["b"], key=lambda p: p.ts)
            after = sorted(found["a"], key=lambda p: p.ts)
            outcomes[meter_id] = energy.merge(before, found["m"], ordered, after)
        return outcomes

    async def _energy(
        self, cur: psycopg.AsyncCursor[Any], outcomes: dict[str, energy.Outcome], closing: datetime
    ) -> tuple[dict[str, energy.Last], list[tuple[str, datetime]]]:
        """Store the pieces; (the cache of each meter's newest hold, the rolled-up device-hours whose pieces
        changed)."""
        # the columns of the pieces, built directly: a meter's pieces have distinct (source, block) keys
        # by construction (one reading per source time, one piece per block), so no row repeats
        ids: list[str] = []
        every: list[energy.Piece] = []
        replace: list[tuple[str, datetime]] = []
        cache: dict[str, energy.Last] = {}
        late: list[tuple[str, datetime]] = []
        for meter_id, outcome in outcomes.items():
            got = outcome.pieces
            ids += [meter_id] * len(got)
            every += got
            if outcome.replace:
                replace.extend((meter_id, ts) for ts in outcome.replace)
            if outcome.last is not None:
                cache[meter_id] = outcome.last
            else:
                self._last.pop(meter_id, None)
        sources, blocks, kwhs, powers, own = columns(every, "ssffb")  # a Piece's fields, in order
        if blocks and min(blocks) < closing:
            late += [(m, rollups.hour_of(b)) for m, b in zip(ids, blocks, strict=True) if b < closing]
        if replace:
            await cur.execute(
                "WITH d AS (DELETE FROM meter_energy e USING unnest(%b::text[], %b::timestamptz[]) AS r(meter_id, "
                "source_ts) WHERE e.meter_id = r.meter_id AND e.source_ts = r.source_ts RETURNING e.meter_id, e.ts) "
                "SELECT DISTINCT meter_id, date_trunc('hour', ts, 'UTC') FROM d WHERE ts < %b",
                (*columns(replace, "ts"), closing),
                binary=True,
            )
            late += await cur.fetchall()
        await cur.execute(
            """
            INSERT INTO meter_energy (meter_id, ts, source_ts, kwh, power_kw, is_reading)
            SELECT * FROM unnest(%b::text[], %b::timestamptz[], %b::timestamptz[], %b::float8[], %b::float8[],
                                 %b::boolean[])
            ON CONFLICT (meter_id, source_ts, ts) DO UPDATE SET
                kwh = EXCLUDED.kwh, power_kw = EXCLUDED.power_kw, is_reading = EXCLUDED.is_reading
            """,
            (Texts(ids), blocks, sources, kwhs, powers, own),
        )
        return cache, late

    async def _vehicles(self, cur: psycopg.AsyncCursor[Any], rows: list[VehicleReading]) -> set[Any]:
        cols = columns([(r.vehicle_id, r.ts, r.soc, r.kwh_delivered_dc, r.battery_temp) for r in rows], "tsfff")
        await cur.execute(
            """
            INSERT INTO vehicle_readings (vehicle_id, ts, soc, kwh_delivered_dc, battery_temp)
            SELECT * FROM unnest(%b::text[], %b::timestamptz[], %b::float8[], %b::float8[], %b::float8[])
            ON CONFLICT DO NOTHING RETURNING 'vehicle', vehicle_id, ts
            """,
            cols,
            binary=True,  # timestamps come back parsed in C, not from text
        )
        new = set(await cur.fetchall())
        latest = _newest(rows, key=lambda r: r.vehicle_id)
        cols = columns([(r.vehicle_id, r.ts, r.soc, r.kwh_delivered_dc, r.battery_temp) for r in latest], "tsfff")
        await cur.execute(
            """
            INSERT INTO vehicle_latest AS l (vehicle_id, ts, soc, kwh_delivered_dc, battery_temp)
            SELECT * FROM unnest(%b::text[], %b::timestamptz[], %b::float8[], %b::float8[], %b::float8[])
            ON CONFLICT (vehicle_id) DO UPDATE SET
                ts = EXCLUDED.ts, soc = EXCLUDED.soc, kwh_delivered_dc = EXCLUDED.kwh_delivered_dc,
                battery_temp = EXCLUDED.battery_temp, updated_at = now()
            WHERE EXCLUDED.ts >= l.ts
            """,
            cols,
        )
        return new

    async def _pumps(self, cur: psycopg.AsyncCursor[Any], rows: list[PumpStatus]) -> set[Any]:
        flat = []
        for r in rows:
            g, f, p = r.status.ground_tank, r.status.roof_tank, r.status.pump
            s = r.status.system
            flat.append(
                (
                    r.device_id,
                    r.ts,
                    g.level_percent,
                    g.level_inches,
                    g.alarm_active,
                    g.connected,
                    g.sensor_working,
                    g.water_supply_on,
                    f.level_percent,
                    f.level_inches,
                    f.alarm_active,
                    f.connected,
                    f.sensor_working,
                    f.water_supply_on,
                    p.running,
                    p.manual_override,
                    p.current_amps,
                    p.power_watts,
                    p.daily_consumption,
                    p.hourly_consumption,
                    p.runtime_minutes,
                    p.total_runtime_hours,
                    p.protection_active,
                    p.overcurrent_protection,
                    p.overtime_protection,
                    s.auto_mode_enabled if s else None,
                    s.manual_pump_control if s else None,
                    s.water_supply_active if s else None,
                )
            )
        await cur.execute(
            """
            INSERT INTO pump_status (
                device_id, ts,
                ground_level_percent, ground_level_inches, ground_alarm_active, ground_connected,
                ground_sensor_working, ground_water_supply_on,
                roof_level_percent, roof_level_inches, roof_alarm_active, roof_connected,
                roof_sensor_working, roof_water_supply_on,
                pump_running, pump_manual_override, pump_current_amps, pump_power_watts,
                pump_daily_consumption, pump_hourly_consumption, pump_runtime_minutes,
                pump_total_runtime_hours, pump_protection_active, pump_overcurrent_protection,
                pump_overtime_protection, auto_mode_enabled, manual_pump_control, water_supply_active)
            SELECT * FROM unnest(
                %b::text[], %b::timestamptz[],
                %b::float8[], %b::float8[], %b::boolean[], %b::boolean[], %b::boolean[], %b::boolean[],
                %b::float8[], %b::float8[], %b::boolean[], %b::boolean[], %b::boolean[], %b::boolean[],
                %b::boolean[], %b::boolean[], %b::float8[], %b::float8[], %b::float8[], %b::float8[],
                %b::float8[], %b::float8[], %b::boolean[], %b::boolean[], %b::boolean[],
                %b::boolean[], %b::boolean[], %b::boolean[])
            ON CONFLICT DO NOTHING RETURNING 'pump', device_id, ts
            """,
            _cols(flat, 28),
            binary=True,  # timestamps come back parsed in C, not from text
        )
        new = set(await cur.fetchall())
        latest = _newest(rows, key=lambda r: r.device_id)
        docs = [
            (
                r.device_id,
                r.ts,
                _json(
                    {
                        "device_id": r.device_id,
                        "timestamp": r.ts.isoformat(),
                        **r.status.model_dump(exclude={"device_id", "timestamp"}, exclude_none=False),
                    }
                ),
                r.status.pump.running,
                r.status.ground_tank.level_percent,
                r.status.roof_tank.level_percent,
                r.status.ground_tank.sensor_working,
            )
            for r in latest
        ]
        await cur.execute(
            """
            INSERT INTO pump_latest AS l (device_id, ts, status, pump_running, ground_level_percent,
                                          roof_level_percent, ground_sensor_working)
            SELECT d, t, s::jsonb, r, g, f, w
            FROM unnest(%b::text[], %b::timestamptz[], %b::text[], %b::boolean[], %b::float8[], %b::float8[],
                        %b::boolean[]) AS v(d, t, s, r, g, f, w)
            ON CONFLICT (device_id) DO UPDATE SET
                ts = EXCLUDED.ts, status = EXCLUDED.status, pump_running = EXCLUDED.pump_running,
                ground_level_percent = EXCLUDED.ground_level_percent,
                roof_level_percent = EXCLUDED.roof_level_percent,
                ground_sensor_working = EXCLUDED.ground_sensor_working, updated_at = now()
            WHERE EXCLUDED.ts >= l.ts
            """,
            _cols(docs, 7),
        )
        return new

    async def _obis(self, cur: psycopg.AsyncCursor[Any], rows: list[ObisReading]) -> set[Any]:
        def flat(rs: list[ObisReading]) -> list[list[Any]]:
            return _cols(
                [(r.meter_id, r.ts, r.obis_code, r.value, r.raw_value, r.scaler, r.unit, r.quality) for r in rs], 8
            )

        await cur.execute(
            """
            INSERT INTO obis_readings (meter_id, ts, obis_code, value, raw_value, scaler, unit, quality)
            SELECT * FROM unnest(%b::text[], %b::timestamptz[], %b::text[], %b::float8[], %b::float8[],
                                 %b::smallint[], %b::text[], %b::text[])
            ON CONFLICT DO NOTHING RETURNING 'obis', meter_id, ts
            """,
            flat(rows),
            binary=True,  # timestamps come back parsed in C, not from text
        )
        new = set(await cur.fetchall())
        latest = _newest(rows, key=lambda r: (r.meter_id, r.obis_code))
        await cur.execute(
            """
            INSERT INTO obis_latest AS l (meter_id, ts, obis_code, value, raw_value, scaler, unit, quality)
            SELECT * FROM unnest(%b::text[], %b::timestamptz[], %b::text[], %b::float8[], %b::float8[],
                                 %b::smallint[], %b::text[], %b::text[])
            ON CONFLICT (meter_id, obis_code) DO UPDATE SET
                ts = EXCLUDED.ts, value = EXCLUDED.value, raw_value = EXCLUDED.raw_value,
                scaler = EXCLUDED.scaler, unit = EXCLUDED.unit, quality = EXCLUDED.quality, updated_at = now()
            WHERE EXCLUDED.ts >= l.ts
            """,
            flat(latest),
        )
        return new

    async def _events(self, cur: psycopg.AsyncCursor[Any], rows: list[PumpEvent]) -> set[Any]:
        unique = {(r.device_id, r.ts, r.event): r for r in rows}
        cols = _cols([(r.device_id, r.ts, r.event, _json(r.payload)) for r in unique.values()], 4)
        await cur.execute(
            """
            INSERT INTO pump_events (device_id, ts, event, payload)
            SELECT d, t, e, p::jsonb FROM unnest(%b::text[], %b::timestamptz[], %b::text[], %b::text[])
                AS v(d, t, e, p)
            ON CONFLICT DO NOTHING RETURNING 'event', device_id, ts
            """,
            cols,
            binary=True,  # timestamps come back parsed in C, not from text
        )
        return set(await cur.fetchall())

    async def _commands(self, cur: psycopg.AsyncCursor[Any], rows: list[CommandResult]) -> None:
        matched = [(i, r) for i, r in enumerate(rows) if r.match is not None]
        if matched:
            await self._matched_commands(cur, rows, matched)
            rows = [r for r in rows if r.match is None]
            if not rows:
                return
        cols = _cols([(r.command_id, r.device_id, "acked" if r.ok else "failed", _json(r.payload)) for r in rows], 4)
        await cur.execute(
            """
            UPDATE commands c SET status = v.status, result = v.result::jsonb, updated_at = now()
            FROM unnest(%b::text[], %b::text[], %b::text[], %b::text[]) AS v(command_id, device_id, status, result)
            WHERE c.command_id = v.command_id AND c.device_id = v.device_id AND c.status IN ('queued', 'sent')
            """,
            cols,
        )

    async def _matched_commands(
        self, cur: psycopg.AsyncCursor[Any], rows: list[CommandResult], matched: list[tuple[int, CommandResult]]
    ) -> None:
        """Answers without a command id (adapted firmwares): each settles the newest pending command of its
        device whose stored payload contains its `match`; the id found is written into the answer, so the
        committed note tells the API which command it was."""
        cols = _cols(
            [(i, r.device_id, _json(r.match), "acked" if r.ok else "failed", _json(r.payload)) for i, r in matched], 5
        )
        await cur.execute(_MATCH_COMMANDS, cols)
        for i, command_id in await cur.fetchall():
            rows[i].payload["commandId"] = command_id

    async def _dead_letters(self, cur: psycopg.AsyncCursor[Any], rows: list[DeadLetter]) -> None:
        cols = _cols([(r.received_at, r.topic, r.device_id, r.payload, r.reason) for r in rows], 5)
        await cur.execute(
            """
            INSERT INTO dead_letters (received_at, topic, device_id, payload, reason)
            SELECT * FROM unnest(%b::timestamptz[], %b::text[], %b::text[], %b::bytea[], %b::text[])
            """,
            cols,
        )


def _grouped(rows: list[MeterReading]) -> dict[str, list[energy.Point]]:
    """The readings as points per meter in time order, one per time: the first received, as the readings'
    ON CONFLICT DO NOTHING keeps."""
    # lists, not dicts by time: hashing an aware datetime calls utcoffset(), and most meters have one
    by_meter: dict[str, list[energy.Point]] = {}
    Point = energy.Point
    for r in rows:
        point = Point(r.ts, r.power_kw, r.kwh_consumed_ac, r.energy_total_kwh)
        points = by_meter.get(r.meter_id)
        if points is None:
            by_meter[r.meter_id] = [point]
        else:
            points.append(point)
    for meter_id, points in by_meter.items():
        if len(points) > 1:
            unique: dict[datetime, energy.Point] = {}
            for p in points:
                unique.setdefault(p.ts, p)
            by_meter[meter_id] = [unique[t] for t in sorted(unique)]
    return by_meter


def _add_context(
    ctx: _Context,
    rows: Sequence[tuple[Any, ...]],
    spans: dict[str, set[datetime]] | None = None,
    inserted: Stored | None = None,
) -> None:
    """The rows of `_ENERGY_CONTEXT` or `_SHARED_NEIGHBOURS` into `ctx`; `spans`/`inserted` (shared mode,
    read after the insert): the batch's reading times per meter and what it inserted, set aside."""
    Point = energy.Point
    for where, meter_id, ts, power, interval, register in rows:
        point = Point(ts, power, interval, register)
        if where == "l":
            ctx.newest[meter_id] = point
        elif where == "p":
            ctx.before_newest[meter_id] = point
        elif where == "m" and inserted is not None and spans and ts in spans[meter_id] and inserted.meter(meter_id, ts):
            continue  # one of the batch's own, inserted just before
        else:
            ctx.found[meter_id][where].append(point)


def _has_meter_reading(message: Message) -> bool:
    return any(isinstance(rec, MeterReading) for rec in message.records)


def _is_new(message: Message, stored: Stored) -> bool:
    """A message counts as stored unless every row it carries was already there (a repeat)."""
    keyed = False
    keys = stored.keys
    for rec in message.records:
        if isinstance(rec, MeterReading):
            if stored.all_meters or ("meter", rec.meter_id, rec.ts) in keys:
                return True
            keyed = True
        elif not isinstance(rec, Presence | CommandResult):
            if rec.key() in keys:
                return True
            keyed = True
    return not keyed


def _meter_row(r: MeterReading) -> tuple[Any, ...]:
    return (
        r.meter_id,
        r.ts,
        r.power_kw,
        r.kwh_consumed_ac,
        r.energy_total_kwh,
        r.voltage,
        r.current,
        r.frequency,
        r.power_factor,
    )


def _newest(rows: Sequence[Any], key: Any) -> list[Any]:
    best: dict[Any, Any] = {}
    for r in rows:
        k = key(r)
        if k not in best or r.ts >= best[k].ts:
            best[k] = r
    return list(best.values())
