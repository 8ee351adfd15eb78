"""Aggregates give the same answers at every level; the full level after `refresh_continuous_aggregate`."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import orjson
import psycopg
import pytest

from bridge.db import Database
from bridge.schema import AGGREGATES
from bridge.telemetry import Decoded, Decoder, Message
from bridge.writer import Writer

from .conftest import query, unique

BERLIN = ZoneInfo("Europe/Berlin")


def messages(items: list[tuple[str, dict[str, object]]], received: datetime | None = None) -> list[Decoded]:
    decoder = Decoder(BERLIN)
    now = received or datetime.now(UTC)
    out: list[Decoded] = []
    for topic, payload in items:
        decoded = decoder.decode(topic, orjson.dumps(payload), now)
        assert isinstance(decoded, Message), decoded
        out.append(decoded)
    return out


async def write(url: str, items: list[Decoded]) -> None:
    async with Database(url) as db:
        await Writer(db).write(items)


def refresh(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for name in AGGREGATES:
            conn.execute(f"CALL refresh_continuous_aggregate('{name}', NULL, NULL)")


def charging_day(vehicle: str, meter: str, ratio: float) -> list[tuple[str, dict[str, object]]]:
    """Six hours of charging ending an hour ago: the meter draws 11 kW AC, the vehicle gets `ratio` of it."""
    end = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(hours=1)
    out: list[tuple[str, dict[str, object]]] = []
    for i in range(36):  # every 10 minutes
        ts = end - timedelta(minutes=10 * (36 - i))
        ms = int(ts.timestamp() * 1000)
        out.append((f"meters/{meter}/reading", {"kwhConsumedAc": 11.0 / 6, "voltage": 230.0, "timestamp": ms}))
        out.append(
            (
                f"vehicles/{vehicle}/reading",
                {"kwhDeliveredDc": 11.0 / 6 * ratio, "soc": 20 + i, "batteryTemp": 30.0 + (i % 3), "timestamp": ms},
            )
        )
    return out


async def store_correlated(
    level: str, url: str, vehicle: str, meter: str, items: list[tuple[str, dict[str, object]]]
) -> None:
    """Write `items`, correlate the vehicle with the meter, and refresh the aggregates on the full level."""
    await write(url, messages(items))
    query(
        url,
        "INSERT INTO meter_vehicle_correlations (vehicle_id, meter_id) VALUES (%s, %s) RETURNING 1",
        (vehicle, meter),
    )
    if level == "full":
        refresh(url)


@pytest.fixture
def levels(plain_url: str, apache_url: str, oracle_url: str) -> dict[str, str]:
    return {"plain": plain_url, "apache": apache_url, "full": oracle_url}


async def test_efficiency_is_the_same_at_every_level(levels: dict[str, str]) -> None:
    """24-hour efficiency of a vehicle and its correlated meter: full (refreshed) equals Apache equals plain."""
    vehicle, meter = unique("ev"), unique("m")
    answers = {}
    for level, url in levels.items():
        await store_correlated(level, url, vehicle, meter, charging_day(vehicle, meter, 0.9))
        answers[level] = query(
            url,
            "SELECT kwh_ac, kwh_dc, efficiency_ratio, round(avg_battery_temp::numeric, 6), "
            "record_count FROM vehicle_efficiency_24h WHERE vehicle_id = %s",
            (vehicle,),
        )
    assert answers["full"] == answers["apache"] == answers["plain"]
    ((kwh_ac, kwh_dc, ratio, temp, count),) = answers["full"]
    assert (kwh_ac, kwh_dc, ratio, count) == (pytest.approx(66.0), pytest.approx(59.4), 0.9, 36)
    assert float(temp) == pytest.approx(31.0)


async def test_known_answer_at_every_level(levels: dict[str, str]) -> None:
    """The 25.0 kWh block, through the writer, reads the same on every level (full: once refreshed)."""
    meter = unique("m")
    start = datetime(2026, 11, 19, 14, 0, tzinfo=BERLIN)
    batch = messages(
        [
            (f"meters/{meter}/reading", {"totalPowerKw": 50, "timestamp": (start + timedelta(minutes=m)).isoformat()})
            for m in range(30)
        ]
    )
    sql = "SELECT total_kwh, reading_count, is_peak FROM meter_blocks_30m WHERE meter_id = %s AND block_start = %s"
    for level, url in levels.items():
        await write(url, batch)
        if level == "full":
            refresh(url)  # the block lies below the watermark: late data waits for a refresh
        assert query(url, sql, (meter, start)) == [(25.0, 30, True)], level


def mixed_meter(meter: str, end: datetime) -> list[tuple[str, dict[str, object]]]:
    """Three hours of a meter that changes method: power near block ends, then a register, then intervals."""
    out: list[tuple[str, dict[str, object]]] = []
    for i in range(36):
        ts = end - timedelta(minutes=5 * (36 - i)) + timedelta(seconds=7 * i)
        body: dict[str, object] = {"totalPowerKw": 3.0 + i % 7, "timestamp": ts.isoformat()}
        if 12 <= i < 24:
            body["energyTotalKwh"] = 1000.0 + 0.4 * i
        elif i >= 24:
            body["kwhConsumedAc"] = 0.25 + 0.01 * i
        out.append((f"meters/{meter}/reading", body))
    return out


async def test_api_queries_match_the_views_at_every_level(levels: dict[str, str]) -> None:
    """current-block and performance (rollups and raw rows, or raw rows only) equal the views on every level."""
    from api import eie, ems
    from bridge.energy import BLOCK, block_start

    vehicle, meter = unique("ev"), unique("m")
    end = datetime.now(UTC).replace(second=0, microsecond=0)
    since = end.replace(minute=0) - timedelta(hours=23)
    first = block_start(end - timedelta(hours=4))
    blocks = [first + i * BLOCK for i in range(10)]
    view = (
        "SELECT block_start, block_end, total_kwh, reading_count, avg_kw, max_kw, is_peak FROM meter_blocks_30m "
        "WHERE meter_id = %s AND block_start = %s"
    )
    for level, url in levels.items():
        await store_correlated(level, url, vehicle, meter, mixed_meter(meter, end) + charging_day(vehicle, meter, 0.9))
        with psycopg.connect(url, autocommit=True) as conn:
            for start in blocks:
                direct = conn.execute(ems._BLOCK_AT, {"id": meter, "start": start}).fetchall()
                assert direct == conn.execute(view, (meter, start)).fetchall(), (level, start)
            (done,) = conn.execute("SELECT done_until FROM rollup_state").fetchone() or (None,)
            assert done is not None and since < done  # the stored hours are rolled up, then the rest
            # all raw, and rollups up to done_until then raw: the same answer
            perfs = [
                conn.execute(eie._PERFORMANCE, {"id": vehicle, "since": since, "raw_from": raw_from}).fetchone()
                for raw_from in (since, done)
            ]
            expected = conn.execute(
                "SELECT kwh_ac, kwh_dc, efficiency_ratio, avg_battery_temp, record_count "
                "FROM vehicle_efficiency_24h WHERE vehicle_id = %s",
                (vehicle,),
            ).fetchone()
        assert expected is not None and expected[0] > 66.0  # the mixed meter's energy counts too
        for perf in perfs:
            assert perf is not None
            assert perf[3:8] == (expected[0], expected[1], expected[2], pytest.approx(expected[3]), expected[4]), level


async def test_late_reading_lands_in_materialized_block(oracle_url: str) -> None:
    """A late reading after a refresh updates the already materialized block once refreshed again."""
    meter = unique("m")
    start = datetime(2026, 11, 18, 10, 0, tzinfo=UTC)

    def at(minute: int, kwh: float) -> tuple[str, dict[str, object]]:
        return (
            f"meters/{meter}/reading",
            {"kwhConsumedAc": kwh, "timestamp": (start + timedelta(minutes=minute)).isoformat()},
        )

    await write(oracle_url, messages([at(0, 1.0), at(20, 1.0)]))
    refresh(oracle_url)
    sql = "SELECT total_kwh FROM meter_blocks_30m WHERE meter_id = %s AND block_start = %s"
    assert query(oracle_url, sql, (meter, start)) == [(2.0,)]
    await write(oracle_url, messages([at(10, 0.5)]))  # late: between the two stored readings
    refresh(oracle_url)
    assert query(oracle_url, sql, (meter, start)) == [(2.5,)]


async def test_a_message_that_breaks_the_writer_is_dead_lettered_not_fatal(apache_url: str) -> None:
    """Any failure while storing one message (here: an unserialisable event payload) dead-letters it alone."""
    device = unique("p")
    good = messages(
        [
            (f"pumps/{device}/event", {"event": "pump_started", "timestamp": "2026-11-20T10:00:00Z"}),
            (f"pumps/{device}/event", {"event": "pump_stopped", "timestamp": "2026-11-20T10:05:00Z"}),
        ]
    )
    broken = good[1]
    assert isinstance(broken, Message)
    record = broken.records[0]
    record.payload["oops"] = object()  # type: ignore[attr-defined]  # orjson cannot write this
    await write(apache_url, good)
    assert query(apache_url, "SELECT event FROM pump_events WHERE device_id = %s", (device,)) == [("pump_started",)]
    (reason,) = query(apache_url, "SELECT reason FROM dead_letters WHERE device_id = %s", (device,))[0]
    assert reason.startswith("internal error while storing: TypeError")
