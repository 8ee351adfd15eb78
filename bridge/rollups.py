"""Hourly rollups of the inputs of `performance/:vehicleId`, kept exact for the last two days.

The endpoint sums a vehicle's DC readings and its correlated meters' energy pieces of the last 24 hours:
~2,900 rows per request at one reading a minute, most of the database's time per request (bench/README.md).
`vehicle_hours` and `meter_hours` hold those sums per device and UTC hour, so a request reads ~24 rollup
rows plus the raw rows of the hours not rolled up yet.

Exactness, on every schema level (plain tables, no TimescaleDB feature):
- `rollup_state.done_until` (on the hour): every hour before it is rolled up; reads take rollups below
  it and raw rows from it on, in one statement (one snapshot).
- Advancing it (`materialize`) takes the advisory lock `LOCK` exclusively; every writing transaction
  holds it shared and reads `done_until` first, so a hour is summed only after each transaction that
  could still write into it as "not rolled up" has committed.
- A transaction writing into a rolled-up hour (late data, a rewritten energy piece) recomputes that
  device-hour before it commits (`recompute`), under a per-key advisory lock, so two bridges doing so
  at once cannot overwrite each other's sums with stale ones.
- Hours are rolled up 10 minutes after they end (a power reading's provisional hold reaches 5 minutes
  into the next block) and kept two days (`KEEP`); the endpoint looks back 24 hours.
Nothing depends on materializing on time: hours past `done_until` are read raw.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from .arrays import Stamps, Texts

LOCK = 0x726F6C6C  # any constant the application uses for nothing else ('roll')
KEEP = timedelta(days=2)
HOUR = timedelta(hours=1)

# the first statement of every writing transaction: the shared lock, and where rollups end
BEGIN = (
    "SELECT pg_advisory_xact_lock_shared(%s), done_until, "
    "date_trunc('hour', now() - interval '10 minutes', 'UTC') FROM rollup_state"
)

# [lo, hi) of every device; `lo`/`hi` on the hour
FILL = (
    "DELETE FROM vehicle_hours WHERE hour >= %(lo)s AND hour < %(hi)s",
    "INSERT INTO vehicle_hours (vehicle_id, hour, kwh_dc, temp_sum, temp_count, readings) "
    "SELECT vehicle_id, date_trunc('hour', ts, 'UTC'), sum(kwh_delivered_dc), sum(battery_temp), "
    "count(battery_temp), count(*) "
    "FROM vehicle_readings WHERE ts >= %(lo)s AND ts < %(hi)s GROUP BY 1, 2",
    "DELETE FROM meter_hours WHERE hour >= %(lo)s AND hour < %(hi)s",
    "INSERT INTO meter_hours (meter_id, hour, kwh, pieces) "
    "SELECT meter_id, date_trunc('hour', ts, 'UTC'), sum(kwh), count(*) "
    "FROM meter_energy WHERE ts >= %(lo)s AND ts < %(hi)s GROUP BY 1, 2",
    "DELETE FROM vehicle_hours WHERE hour < %(hi)s::timestamptz - interval '2 days'",
    "DELETE FROM meter_hours WHERE hour < %(hi)s::timestamptz - interval '2 days'",
    "UPDATE rollup_state SET done_until = %(hi)s",
)

# everything again, from the raw tables: for the migration, and after rows were loaded around the bridge
# (bench/api_load.py COPYs its readings); statements without parameters, run in one transaction
REBUILD = (
    "SELECT pg_advisory_xact_lock(1919904876)",  # LOCK
    "UPDATE rollup_state SET done_until = date_trunc('hour', now() - interval '10 minutes', 'UTC')",
    "DELETE FROM vehicle_hours",
    "DELETE FROM meter_hours",
    "INSERT INTO vehicle_hours (vehicle_id, hour, kwh_dc, temp_sum, temp_count, readings) "
    "SELECT vehicle_id, date_trunc('hour', ts, 'UTC'), sum(kwh_delivered_dc), sum(battery_temp), "
    "count(battery_temp), count(*) "
    "FROM vehicle_readings, rollup_state s "
    "WHERE ts >= s.done_until - interval '2 days' AND ts < s.done_until GROUP BY 1, 2",
    "INSERT INTO meter_hours (meter_id, hour, kwh, pieces) "
    "SELECT meter_id, date_trunc('hour', ts, 'UTC'), sum(kwh), count(*) "
    "FROM meter_energy, rollup_state s "
    "WHERE ts >= s.done_until - interval '2 days' AND ts < s.done_until GROUP BY 1, 2",
)

_KEY_LOCKS = (
    "SELECT pg_advisory_xact_lock(hashtextextended(k, 0)) FROM (SELECT DISTINCT unnest(%b::text[]) AS k ORDER BY k) s"
)
_RECOMPUTE = {
    "vehicle": (
        "DELETE FROM vehicle_hours h USING unnest(%(ids)b::text[], %(hours)b::timestamptz[]) AS k(id, hour) "
        "WHERE h.vehicle_id = k.id AND h.hour = k.hour",
        "INSERT INTO vehicle_hours (vehicle_id, hour, kwh_dc, temp_sum, temp_count, readings) "
        "SELECT vehicle_id, date_trunc('hour', ts, 'UTC'), sum(kwh_delivered_dc), sum(battery_temp), "
        "count(battery_temp), count(*) "
        "FROM vehicle_readings r JOIN unnest(%(ids)b::text[], %(hours)b::timestamptz[]) AS k(id, hour) "
        "ON r.vehicle_id = k.id AND r.ts >= k.hour AND r.ts < k.hour + interval '1 hour' GROUP BY 1, 2",
    ),
    "meter": (
        "DELETE FROM meter_hours h USING unnest(%(ids)b::text[], %(hours)b::timestamptz[]) AS k(id, hour) "
        "WHERE h.meter_id = k.id AND h.hour = k.hour",
        "INSERT INTO meter_hours (meter_id, hour, kwh, pieces) "
        "SELECT meter_id, date_trunc('hour', ts, 'UTC'), sum(kwh), count(*) "
        "FROM meter_energy e JOIN unnest(%(ids)b::text[], %(hours)b::timestamptz[]) AS k(id, hour) "
        "ON e.meter_id = k.id AND e.ts >= k.hour AND e.ts < k.hour + interval '1 hour' GROUP BY 1, 2",
    ),
}


def hour_of(ts: datetime) -> datetime:
    return ts.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


async def begin(cur: psycopg.AsyncCursor[Any]) -> tuple[datetime, datetime]:
    """Join the writers (shared lock); (where rollups end, where they could end now)."""
    await cur.execute(BEGIN, (LOCK,))
    row = await cur.fetchone()
    assert row is not None, "rollup_state has its one row from migration 0004"
    return row[1], row[2]


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
            params = {"ids": Texts([d for d, _ in got]), "hours": Stamps([h for _, h in got])}
            for sql in _RECOMPUTE[kind]:
                await cur.execute(sql, params)


async def materialize(conn: psycopg.AsyncConnection[Any]) -> datetime | None:
    """Roll up the hours that ended over 10 minutes ago; the new `done_until`, or None if nothing was due."""
    async with conn.transaction(), conn.cursor() as cur:
        await cur.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK,))
        await cur.execute(
            "SELECT done_until, date_trunc('hour', now() - interval '10 minutes', 'UTC') FROM rollup_state"
        )
        row = await cur.fetchone()
        assert row is not None
        done, due = row
        if due <= done:
            return None
        params = {"lo": max(done, due - KEEP), "hi": due}
        for sql in FILL:
            await cur.execute(sql, params)
        return due
