"""Hourly rollups (bridge/rollups.py) equal the sums of the raw rows, through late data, rewritten energy
pieces, materialization and concurrent writers."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from bridge import rollups
from bridge.db import Database
from bridge.writer import Writer

from .conftest import create_database, query, unique
from .test_aggregates import messages, write

RAW_VEHICLE = """
    SELECT vehicle_id, date_trunc('hour', ts, 'UTC') AS hour, sum(kwh_delivered_dc), sum(battery_temp),
           count(battery_temp), count(*)
    FROM vehicle_readings WHERE vehicle_id = %(id)s AND ts < %(done)s GROUP BY 1, 2 ORDER BY 2
"""
ROLLED_VEHICLE = """
    SELECT vehicle_id, hour, kwh_dc, temp_sum, temp_count, readings FROM vehicle_hours
    WHERE vehicle_id = %(id)s AND hour < %(done)s ORDER BY hour
"""
RAW_METER = """
    SELECT meter_id, date_trunc('hour', ts, 'UTC') AS hour, sum(kwh), count(*)
    FROM meter_energy WHERE meter_id = %(id)s AND ts < %(done)s GROUP BY 1, 2 ORDER BY 2
"""
ROLLED_METER = (
    "SELECT meter_id, hour, kwh, pieces FROM meter_hours WHERE meter_id = %(id)s AND hour < %(done)s ORDER BY hour"
)


@pytest.fixture
def levels(plain_url: str, apache_url: str, oracle_url: str) -> dict[str, str]:
    return {"plain": plain_url, "apache": apache_url, "full": oracle_url}


def done_until(url: str) -> datetime:
    return query(url, "SELECT done_until FROM rollup_state")[0][0]


def approx_rows(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    return [tuple(pytest.approx(v) if isinstance(v, float) else v for v in r) for r in rows]


def assert_rolled_up(url: str, vehicle: str | None = None, meter: str | None = None) -> None:
    params = {"done": done_until(url)}
    if vehicle is not None:
        raw = query(url, RAW_VEHICLE, {**params, "id": vehicle})
        assert raw, "the test wrote vehicle rows in rolled-up hours"
        assert query(url, ROLLED_VEHICLE, {**params, "id": vehicle}) == approx_rows(raw)
    if meter is not None:
        raw = query(url, RAW_METER, {**params, "id": meter})
        assert raw, "the test wrote energy pieces in rolled-up hours"
        assert query(url, ROLLED_METER, {**params, "id": meter}) == approx_rows(raw)


def power(meter: str, ts: datetime, kw: float) -> tuple[str, dict[str, object]]:
    return f"meters/{meter}/reading", {"totalPowerKw": kw, "timestamp": ts.isoformat()}


def dc(vehicle: str, ts: datetime, kwh: float, temp: float | None = 30.0) -> tuple[str, dict[str, object]]:
    body: dict[str, object] = {"kwhDeliveredDc": kwh, "soc": 50.0, "timestamp": ts.isoformat()}
    if temp is not None:
        body["batteryTemp"] = temp
    return f"vehicles/{vehicle}/reading", body


async def test_late_and_rewritten_rows_keep_rollups_exact(levels: dict[str, str]) -> None:
    """Rows in rolled-up hours (late readings, a power hold shortened by a later batch) are summed again."""
    for level, url in levels.items():
        vehicle, meter = unique("roll-v"), unique("roll-m")
        base = done_until(url) - timedelta(hours=3)
        first = [power(meter, base + timedelta(minutes=m), 10.0 + m) for m in (0, 20, 40, 58)]
        first += [dc(vehicle, base + timedelta(minutes=m), 0.5, temp=None if m == 20 else 30.0) for m in (0, 20, 70)]
        await write(url, messages(first))
        assert_rolled_up(url, vehicle, meter)
        # a reading between two stored ones shortens the hold of the earlier one (its piece is rewritten),
        # and one 2 minutes after the hour's last reading moves part of the energy across the hour
        await write(
            url,
            messages(
                [power(meter, base + timedelta(minutes=10), 99.0), power(meter, base + timedelta(minutes=62), 1.0)]
            ),
        )
        await write(
            url, messages([dc(vehicle, base + timedelta(minutes=30), 0.25), dc(vehicle, base, 0.5)])
        )  # one repeat
        assert_rolled_up(url, vehicle, meter)
        assert query(url, ROLLED_VEHICLE, {"id": vehicle, "done": done_until(url)})[0][5] == 3, level


async def test_materialize_rolls_up_the_hours_that_are_due(pg_admin_url: str) -> None:
    """materialize() closes and sums every device's hours up to 10 minutes ago, keeping what writers
    recomputed meanwhile; then nothing is due."""
    url = create_database(pg_admin_url)
    vehicle, meter, late = unique("roll-v"), unique("roll-m"), unique("roll-late")
    now = datetime.now(UTC)
    recent = [now - timedelta(minutes=m) for m in (170, 130, 95, 65, 30)]
    await write(url, messages([power(meter, ts, 7.0) for ts in recent] + [dc(vehicle, ts, 1.0) for ts in recent]))
    # as if the bridge had not rolled up for three hours
    query(url, "UPDATE rollup_state SET done_until = done_until - interval '3 hours' RETURNING 1")
    query(url, "DELETE FROM vehicle_hours RETURNING 1")
    query(url, "DELETE FROM meter_hours RETURNING 1")
    # closed but not summed yet: a writer sums the hour it writes into itself
    await write(url, messages([dc(late, now - timedelta(minutes=150), 3.0)]))
    assert query(url, "SELECT readings FROM vehicle_hours WHERE vehicle_id = %s", (late,)) == [(1,)]
    query(url, "UPDATE rollup_state SET closing = done_until RETURNING 1")
    expected = rollups.hour_of(now - timedelta(minutes=10))
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        assert await rollups.materialize(conn) == expected
        assert await rollups.materialize(conn) is None
    assert query(url, "SELECT closing, done_until FROM rollup_state") == [(expected, expected)]
    assert_rolled_up(url, vehicle, meter)
    assert_rolled_up(url, vehicle=late)


async def test_the_bridges_roller_rolls_up_in_the_background(pg_admin_url: str) -> None:
    """Roller (the bridge's background task) runs materialize() on its own connection."""
    url = create_database(pg_admin_url)
    vehicle = unique("roll-v")
    await write(url, messages([dc(vehicle, datetime.now(UTC) - timedelta(minutes=100), 2.0)]))
    query(url, "UPDATE rollup_state SET done_until = done_until - interval '2 hours' RETURNING 1")
    query(url, "DELETE FROM vehicle_hours RETURNING 1")
    expected = rollups.hour_of(datetime.now(UTC) - timedelta(minutes=10))
    async with rollups.Roller(url, every=0.05) as roller:
        for _ in range(200):
            if roller.done_until is not None:
                break
            await asyncio.sleep(0.05)
    assert roller.done_until == expected == done_until(url)
    assert_rolled_up(url, vehicle=vehicle)


async def test_concurrent_late_writers_do_not_lose_sums(apache_url: str) -> None:
    """Two bridges storing late readings of one vehicle-hour at once: the rollup has both (per-key lock)."""
    vehicle = unique("roll-v")
    hour = done_until(apache_url) - timedelta(hours=2)
    async with Database(apache_url) as a, Database(apache_url) as b:
        writers = [Writer(a, shared=True), Writer(b, shared=True)]
        for round_ in range(5):
            batches = [
                messages([dc(vehicle, hour + timedelta(minutes=round_ * 10 + k, seconds=s), 0.1) for s in range(3)])
                for k in range(2)
            ]
            await asyncio.gather(*(w.write(batch) for w, batch in zip(writers, batches, strict=True)))
    assert_rolled_up(apache_url, vehicle=vehicle)
    assert query(apache_url, ROLLED_VEHICLE, {"id": vehicle, "done": done_until(apache_url)})[0][5] == 30


def test_rebuild_takes_the_lock_the_writers_share() -> None:
    """REBUILD (migration, bulk loads) locks the same advisory key as materialize()."""
    assert rollups.REBUILD[0] == f"SELECT pg_advisory_xact_lock({rollups.LOCK})"
