"""The writer's energy pieces in a real database: any arrival order, batching and writer split give the plain rule."""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import pytest

from bridge.db import Database
from bridge.energy import Point
from bridge.schema import COUNTER_TOTAL
from bridge.writer import Writer

from .conftest import query, unique
from .test_aggregates import messages
from .test_energy import random_reading, reference_totals

T0 = datetime(2026, 3, 2, 10, 0, tzinfo=UTC)


def reading_message(meter: str, p: Point) -> tuple[str, dict[str, object]]:
    body: dict[str, object] = {"timestamp": p.ts.isoformat()}
    fields = (("totalPowerKw", p.power_kw), ("kwhConsumedAc", p.kwh_interval), ("energyTotalKwh", p.register))
    for name, value in fields:
        if value is not None:
            body[name] = value
    return f"meters/{meter}/reading", body


def fleet(rng: random.Random, meters: int) -> dict[str, list[Point]]:
    out = {}
    for _ in range(meters):
        ts = T0 + timedelta(seconds=rng.randrange(1800))
        points = []
        for _ in range(rng.randrange(5, 40)):
            ts += timedelta(seconds=rng.choice([0.5, 7, 45, 170, 299, 301, 900]))
            points.append(random_reading(rng, ts))
        out[unique("wr-m")] = points
    return out


def stored_blocks(url: str, meters: Sequence[str]) -> dict[tuple[str, datetime], float]:
    sql = "SELECT meter_id, ts, sum(kwh) FROM meter_energy WHERE meter_id = ANY(%s) GROUP BY 1, 2"
    rows = query(url, sql, (list(meters),))
    return {(m, b): kwh for m, b, kwh in rows}


def assert_plain_rule(url: str, readings: dict[str, list[Point]]) -> None:
    got = stored_blocks(url, list(readings))
    expected = {(m, b): kwh for m, pts in readings.items() for b, kwh in reference_totals(pts).items()}
    for key in set(got) | set(expected):
        assert got.get(key, 0.0) == pytest.approx(expected.get(key, 0.0), abs=1e-6), key


def assert_latest(url: str, readings: dict[str, list[Point]]) -> None:
    """meter_latest holds each meter's newest reading."""
    rows = query(url, "SELECT meter_id, ts, power_kw FROM meter_latest WHERE meter_id = ANY(%s)", (list(readings),))
    newest = {m: max(pts, key=lambda p: p.ts) for m, pts in readings.items()}
    assert {m: (ts, kw) for m, ts, kw in rows} == {m: (p.ts, p.power_kw) for m, p in newest.items()}


def arrival(rng: random.Random, readings: dict[str, list[Point]], late: bool) -> list[tuple[str, Point]]:
    """Every reading once, interleaved across meters in time order; `late`: some shuffled and repeated too."""
    order = sorted(((m, p) for m, pts in readings.items() for p in pts), key=lambda mp: mp[1].ts)
    if late:
        for _ in range(len(order) // 4):
            i, j = rng.randrange(len(order)), rng.randrange(len(order))
            order[i], order[j] = order[j], order[i]
        order += rng.sample(order, len(order) // 10)
    return order


def batches(rng: random.Random, order: list[tuple[str, Point]]) -> list[list[tuple[str, Point]]]:
    out, i = [], 0
    while i < len(order):
        n = rng.randrange(1, 40)
        out.append(order[i : i + n])
        i += n
    return out


@pytest.mark.parametrize("late", [False, True], ids=["in-order", "late"])
async def test_one_writer_stores_the_plain_rules_blocks(apache_url: str, late: bool) -> None:
    """One writer (its cache, first sight of meters, late data, repeats) stores every meter's block kWh."""
    rng = random.Random(11 + late)
    readings = fleet(rng, 12)
    async with Database(apache_url) as db:
        writer = Writer(db)
        for batch in batches(rng, arrival(rng, readings, late)):
            await writer.write(messages([reading_message(m, p) for m, p in batch]))
    assert_plain_rule(apache_url, readings)


@pytest.mark.parametrize("late", [False, True], ids=["in-order", "late"])
async def test_shared_writers_store_the_plain_rules_blocks(apache_url: str, late: bool) -> None:
    """Two writers on a shared subscription, each meter's readings split between them, store the same blocks."""
    rng = random.Random(21 + late)
    readings = fleet(rng, 12)
    async with Database(apache_url) as a, Database(apache_url) as b:
        writers = [Writer(a, shared=True), Writer(b, shared=True)]
        # round-robin, as a broker hands a shared subscription's messages out: consecutive readings of a
        # meter go to different writers, whose batches commit in either order
        halves: list[list[tuple[str, Point]]] = [[], []]
        for i, item in enumerate(arrival(rng, readings, late)):
            halves[i % 2].append(item)
        queues = [batches(rng, h) for h in halves]

        async def run(writer: Writer, queue: list[list[tuple[str, Point]]]) -> None:
            for batch in queue:
                await writer.write(messages([reading_message(m, p) for m, p in batch]))
                await asyncio.sleep(rng.random() * 0.002)

        await asyncio.gather(*(run(w, q) for w, q in zip(writers, queues, strict=True)))
    assert_plain_rule(apache_url, readings)
    assert_latest(apache_url, readings)


async def test_shared_writer_counts_the_newest_by_its_predecessor(apache_url: str) -> None:
    """A shared writer following another's mixed reading looks up the register before it (how that one counted)."""
    meter = unique("wr-m")
    ts = [T0 + timedelta(seconds=s) for s in (0, 60, 120)]
    readings = {meter: [Point(ts[0], None, None, 100.0), Point(ts[1], 3.5, None, 100.5), Point(ts[2], 2.0, None, None)]}
    async with Database(apache_url) as a, Database(apache_url) as b:
        first, second = Writer(a, shared=True), Writer(b, shared=True)
        await first.write(messages([reading_message(meter, p) for p in readings[meter][:2]]))
        await second.write(messages([reading_message(meter, readings[meter][2])]))
    assert_plain_rule(apache_url, readings)
    assert_latest(apache_url, readings)


@pytest.mark.parametrize("shared", [False, True], ids=["one", "shared"])
async def test_refused_message_is_dead_lettered_and_its_batch_lands(apache_url: str, shared: bool) -> None:
    """A message the database refuses mid-batch (its statements pipelined) is dead-lettered alone; the rest land."""
    meters = [unique("wr-m") for _ in range(3)]
    batch = messages(
        [reading_message(m, Point(T0 + timedelta(minutes=i), 2.0, None, None)) for i, m in enumerate(meters)]
    )
    batch[1] = dataclasses.replace(batch[1], kind="bogus")  # type: ignore[arg-type]  # outside devices' CHECK
    async with Database(apache_url) as db:
        result = await Writer(db, shared=shared).write(batch)
    assert (result.received, result.stored, result.dead_letters) == (3, 2, 1)
    stored = query(apache_url, "SELECT meter_id FROM meter_readings WHERE meter_id = ANY(%s)", (meters,))
    assert sorted(r[0] for r in stored) == sorted([meters[0], meters[2]])
    reason = query(apache_url, "SELECT reason FROM dead_letters WHERE topic = %s", (f"meters/{meters[1]}/reading",))
    assert [r[0].split(":")[:2] for r in reason] == [["refused by the database", " CheckViolation"]]


async def test_restarted_writer_continues_from_the_database(apache_url: str) -> None:
    """A new writer (no cache) continuing meters another stored: the held power readings are corrected."""
    rng = random.Random(31)
    readings = fleet(rng, 8)
    order = arrival(rng, readings, late=False)
    half = len(order) // 2
    async with Database(apache_url) as db:
        for part in (order[:half], order[half:]):
            writer = Writer(db)  # a fresh one each time: what a restarted bridge has
            for batch in batches(rng, part):
                await writer.write(messages([reading_message(m, p) for m, p in batch]))
    assert_plain_rule(apache_url, readings)


async def test_writers_count_in_their_own_shards(apache_url: str) -> None:
    """Two writers' batches each add to their backend's counter row (no row both lock); the sums are exact."""
    before = query(apache_url, COUNTER_TOTAL, ("messages_received",))[0][0]
    rng = random.Random(51)
    async with Database(apache_url) as a, Database(apache_url) as b:
        writers = [Writer(a), Writer(b)]
        shards = set()
        for db in (a, b):
            cur = await (await db.connection()).execute("SELECT pg_backend_pid() % 64")
            shards.add((await cur.fetchone() or (None,))[0])
        sent = 0
        for i, batch in enumerate(batches(rng, arrival(rng, fleet(rng, 4), late=False))):
            await writers[i % 2].write(messages([reading_message(m, p) for m, p in batch]))
            sent += len(batch)
    assert query(apache_url, COUNTER_TOTAL, ("messages_received",))[0][0] == before + sent
    written = {r[0] for r in query(apache_url, "SELECT shard FROM counters WHERE name = 'messages_received'")}
    assert shards <= written


def test_readings_cover_every_kind() -> None:
    """The random fleet has power, register, interval and mixed meters (else the tests above prove less)."""
    points = [p for pts in fleet(random.Random(11), 12).values() for p in pts]
    kinds = defaultdict(int)
    for p in points:
        kinds[(p.power_kw is not None, p.kwh_interval is not None, p.register is not None)] += 1
    assert {(True, False, False), (False, False, True), (False, True, False), (True, False, True)} <= set(kinds)
