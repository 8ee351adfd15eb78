"""Hourly rollups of the inputs of `performance/:vehicleId`, kept exact for the last two days.

The endpoint sums a vehicle's DC readings and its correlated meters' energy pieces of the last 24 hours:
~2,900 rows per request at one reading a minute, most of the database's time per request (bench/README.md).
`vehicle_hours` and `meter_hours` hold those sums per device and UTC hour, so a request reads ~24 rollup
rows plus the raw rows of the hours not rolled up yet.

Exactness, on every schema level (plain tables, no TimescaleDB feature), with two marks in
`rollup_state`, both on the hour:
- `closing`: writers treat every hour before it as rolled up. A transaction writing into such an hour
  (late data, a rewritten energy piece) sums that device-hour again from the raw rows before it commits
  (`recompute`), under a per-key advisory lock so two bridges cannot overwrite each other's sums.
- `done_until` (<= closing): every hour before it is complete in the rollups; reads take rollups below
  it and raw rows from it on, in one statement (one snapshot).
`materialize` (run by `Roller`, the bridge's background task) moves `closing` under the advisory lock
`LOCK` held exclusively (every writing transaction
holds it shared and reads `closing` first, so this waits for the transactions that may have written
into those hours unnoticed), then, without blocking writers, sums the closed hours of every device
(keeping any device-hour a writer already recomputed: a writer's sum is never older) and moves
`done_until`. A device-hour whose rows all went away keeps a row with a zero count, so the bulk sum
cannot bring back a stale one.

Hours close 10 minutes after they end (a power reading's provisional hold reaches 5 minutes into the
next block) and are kept two days (`KEEP`); the endpoint looks back 24 hours. Nothing depends on
materializing on time: hours past `done_until` are read raw.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from .arrays import Stamps, Texts
from .db import Database

log = logging.getLogger(__name__)

LOCK = 0x726F6C6C  # any constant the application uses for nothing else ('roll')
KEEP = timedelta(days=2)

# the last hour that may close now (a power reading's provisional hold reaches 5 minutes past its block);
# the statements below are put together from these module constants only
_DUE = "date_trunc('hour', now() - interval '10 minutes', 'UTC')"
_STATE = f"SELECT closing, done_until, {_DUE} FROM rollup_state"  # noqa: S608
_CLOSE = f"UPDATE rollup_state SET closing = greatest(closing, {_DUE}) RETURNING closing"  # noqa: S608

# one row per device and hour: the insert's head and the select list of its sums
_VEHICLE_SUMS = (
    "INSERT INTO vehicle_hours (vehicle_id, hour, kwh_dc, temp_sum, temp_count, readings) "
    "SELECT vehicle_id, date_trunc('hour', ts, 'UTC'), sum(kwh_delivered_dc), sum(battery_temp), "
    "count(battery_temp), count(*) FROM vehicle_readings"
)
_METER_SUMS = (
    "INSERT INTO meter_hours (meter_id, hour, kwh, pieces) "
    "SELECT meter_id, date_trunc('hour', ts, 'UTC'), sum(kwh), count(*) FROM meter_energy"
)

# every device's sums of [lo, hi), both on the hour, beside what writers recomputed meanwhile
_FILL = (
    f"{_VEHICLE_SUMS} WHERE ts >= %(lo)s AND ts < %(hi)s GROUP BY 1, 2 ON CONFLICT DO NOTHING",
    f"{_METER_SUMS} WHERE ts >= %(lo)s AND ts < %(hi)s GROUP BY 1, 2 ON CONFLICT DO NOTHING",
    "DELETE FROM vehicle_hours WHERE hour < %(hi)s::timestamptz - interval '2 days'",
    "DELETE FROM meter_hours WHERE hour < %(hi)s::timestamptz - interval '2 days'",
    "UPDATE rollup_state SET done_until = %(hi)s",
)

# everything again from the raw tables, blocking writers meanwhile: for the migration, and after rows
# were loaded around the bridge (bench/api_load.py COPYs its readings); one transaction, no parameters
REBUILD = (
    f"SELECT pg_advisory_xact_lock({LOCK})",
    f"UPDATE rollup_state SET done_until = {_DUE}, closing = {_DUE}",  # noqa: S608
    "DELETE FROM vehicle_hours",
    "DELETE FROM meter_hours",
    f"{_VEHICLE_SUMS}, rollup_state s WHERE ts >= s.done_until - interval '2 days' AND ts < s.done_until GROUP BY 1, 2",
    f"{_METER_SUMS}, rollup_state s WHERE ts >= s.done_until - interval '2 days' AND ts < s.done_until GROUP BY 1, 2",
)

_KEY_LOCKS = (
    "SELECT pg_advisory_xact_lock(hashtextextended(k, 0)) FROM (SELECT DISTINCT unnest(%b::text[]) AS k ORDER BY k) s"
)
# one row per requested device-hour, zero counts included
_RECOMPUTE = {
    "vehicle": "INSERT INTO vehicle_hours AS h (vehicle_id, hour, kwh_dc, temp_sum, temp_count, readings) "
    "SELECT k.id, k.hour, sum(r.kwh_delivered_dc), sum(r.battery_temp), count(r.battery_temp), count(r.vehicle_id) "
    "FROM unnest(%(ids)b::text[], %(hours)b::timestamptz[]) AS k(id, hour) LEFT JOIN vehicle_readings r "
    "ON r.vehicle_id = k.id AND r.ts >= k.hour AND r.ts < k.hour + interval '1 hour' GROUP BY 1, 2 "
    "ON CONFLICT (vehicle_id, hour) DO UPDATE SET kwh_dc = EXCLUDED.kwh_dc, temp_sum = EXCLUDED.temp_sum, "
    "temp_count = EXCLUDED.temp_count, readings = EXCLUDED.readings",
    "meter": "INSERT INTO meter_hours AS h (meter_id, hour, kwh, pieces) "
    "SELECT k.id, k.hour, coalesce(sum(e.kwh), 0), count(e.meter_id) "
    "FROM unnest(%(ids)b::text[], %(hours)b::timestamptz[]) AS k(id, hour) LEFT JOIN meter_energy e "
    "ON e.meter_id = k.id AND e.ts >= k.hour AND e.ts < k.hour + interval '1 hour' GROUP BY 1, 2 "
    "ON CONFLICT (meter_id, hour) DO UPDATE SET kwh = EXCLUDED.kwh, pieces = EXCLUDED.pieces",
}


def hour_of(ts: datetime) -> datetime:
    return ts.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


async def begin(cur: psycopg.AsyncCursor[Any]) -> datetime:
    """Join the writers (shared lock); the hour before which this transaction's writes must `recompute`."""
    await cur.execute("SELECT pg_advisory_xact_lock_shared(%s)", (LOCK,))
    # a statement of its own: its snapshot is taken once the lock is held, so `closing` cannot have moved
    await cur.execute("SELECT closing FROM rollup_state")
    row = await cur.fetchone()
    assert row is not None, "rollup_state has its one row from migration 0004"
    closing: datetime = row[0]
    return closing


async def recompute(
    cur: psycopg.AsyncCursor[Any], vehicles: Iterable[tuple[str, datetime]], meters: Iterable[tuple[str, datetime]]
) -> None:
    """Sum these device-hours again from the raw rows, this transaction's own writes included."""
    keys = {"vehicle": sorted(set(vehicles)), "meter": sorted(set(meters))}
    names = [f"{kind}|{d}|{h.isoformat()}" for kind, got in keys.items() for d, h in got]
    if not names:
        return
    await cur.execute(_KEY_LOCKS, (Texts(names),))
    for kind, got in keys.items():
        if got:
            await cur.execute(
                _RECOMPUTE[kind], {"ids": Texts([d for d, _ in got]), "hours": Stamps([h for _, h in got])}
            )


async def materialize(conn: psycopg.AsyncConnection[Any]) -> datetime | None:
    """Close the hours that ended over 10 minutes ago and sum them; the new `done_until`, or None."""
    cur = await conn.execute(_STATE)
    row = await cur.fetchone()
    assert row is not None, "rollup_state has its one row from migration 0004"
    closing: datetime
    closing, done, due = row
    if due > closing:
        async with conn.transaction():
            # waits for every writing transaction begun before; later ones see the new `closing`
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK,))
            cur = await conn.execute(_CLOSE)
            row = await cur.fetchone()
            assert row is not None
            closing = row[0]
    elif done >= closing:
        return None
    async with conn.transaction():
        # one materializer at a time (several bridges): another one busy with it has it in hand
        cur = await conn.execute("SELECT done_until FROM rollup_state FOR UPDATE SKIP LOCKED")
        row = await cur.fetchone()
        if row is None or row[0] >= closing:
            return None
        params = {"lo": max(row[0], closing - KEEP), "hi": closing}
        for sql in _FILL:
            await conn.execute(sql, params)
        return closing


class Roller:
    """The bridge's background task that rolls hours up, on a connection of its own so that summing an
    hour of every device never holds up the writers (the stall is one batch, while `closing` moves)."""

    def __init__(self, database_url: str, every: float = 60.0) -> None:
        self._url = database_url
        self._every = every
        self._task: asyncio.Task[None] | None = None
        self.done_until: datetime | None = None  # the last hour it rolled up to (for tests and logs)

    async def __aenter__(self) -> Roller:
        self._task = asyncio.create_task(self._run(), name="rollups")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        async with Database(self._url) as db:
            while True:
                try:
                    done = await materialize(await db.connection())
                except Exception as exc:  # reads fall back to raw rows past done_until: slower, still exact
                    log.warning("rolling up hours failed, trying again in %.0f s: %s", self._every, exc)
                else:
                    if done is not None:
                        self.done_until = done
                        log.info("rolled up the hours before %s", done.isoformat())
                await asyncio.sleep(self._every)
