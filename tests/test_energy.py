"""Energy pieces: block kWh from registers, interval kWh or held power (no services needed)."""

from __future__ import annotations

import random
from collections import defaultdict
from datetime import UTC, datetime, timedelta

import pytest

from bridge.energy import Last, Piece, Point, block_start, extend, merge, pieces

T0 = datetime(2026, 11, 20, 13, 0, tzinfo=UTC)


def totals(pieces: list[Piece]) -> dict[datetime, float]:
    latest: dict[tuple[datetime, datetime], float] = {}
    for p in pieces:  # later pieces of the same key replace earlier ones, as the upsert does
        latest[(p.source_ts, p.block)] = p.kwh
    out: dict[datetime, float] = defaultdict(float)
    for (_, block), kwh in latest.items():
        out[block] += kwh
    return dict(out)


def power(minute: int, kw: float = 50.0) -> Point:
    return Point(T0 + timedelta(minutes=minute), kw, None, None)


def test_constant_50kw_every_minute_is_25kwh() -> None:
    """CONTRACT's known answer: 50 kW reported every 60 s for a whole block is 25.0 kWh."""
    out = merge([], [], [power(m) for m in range(30)])
    assert totals(out.pieces)[T0] == pytest.approx(25.0)


def test_extend_in_order_equals_merge() -> None:
    """Batches processed in order from the cache give the same blocks as one merge."""
    first = merge([], [], [power(m) for m in range(10)])
    assert first.last is not None
    second = extend(first.last, [power(m) for m in range(10, 30)])
    assert totals(first.pieces + second.pieces) == pytest.approx(
        totals(merge([], [], [power(m) for m in range(30)]).pieces)
    )


def test_power_hold_is_capped_at_five_minutes() -> None:
    """A reading's power holds until the next one, for at most 5 minutes."""
    out = merge([], [], [power(0, 60.0), power(20, 0.0)])
    assert totals(out.pieces)[T0] == pytest.approx(5.0)  # 60 kW x 5 min


def test_provisional_hold_spills_into_next_block_and_is_shortened() -> None:
    """The newest reading holds 5 min provisionally; the next reading shortens it with the same keys."""
    first = merge([], [], [power(28)])
    assert totals(first.pieces) == pytest.approx({T0: 50 * 2 / 60, T0 + timedelta(minutes=30): 50 * 3 / 60})
    assert first.last is not None
    second = extend(first.last, [power(29)])
    t = totals(first.pieces + second.pieces)
    assert t[T0] == pytest.approx(50 * 2 / 60)
    assert t[T0 + timedelta(minutes=30)] == pytest.approx(50 * 4 / 60)


def test_register_differences_spread_over_blocks() -> None:
    """Register differences are spread over (previous, this] by time."""
    pts = [Point(T0 + timedelta(minutes=20 * i), None, None, 100.0 + 10 * i) for i in range(4)]
    t = totals(merge([], [], pts).pieces)
    assert t[T0] == pytest.approx(15.0) and t[T0 + timedelta(minutes=30)] == pytest.approx(15.0)


def test_register_reset_never_goes_negative() -> None:
    """A register that goes down was reset: its new value counts, never a negative difference."""
    pts = [Point(T0, None, None, 1000.0), Point(T0 + timedelta(minutes=10), None, None, 3.0)]
    t = totals(merge([], [], pts).pieces)
    assert t[T0] == pytest.approx(3.0)
    assert all(v >= 0 for v in t.values())


def test_interval_kwh_without_previous_lands_in_own_block() -> None:
    """The first interval reading of a meter counts in its own block."""
    t = totals(merge([], [], [Point(T0 + timedelta(minutes=5), None, 2.0, None)]).pieces)
    assert t[T0] == pytest.approx(2.0)


def test_register_meter_has_no_provisional_power_hold() -> None:
    """A meter with a register and power is counted by register differences only."""
    pts = [Point(T0 + timedelta(minutes=i), 50.0, None, 100.0 + i * 50 / 60) for i in range(31)]
    t = totals(merge([], [], pts).pieces)
    assert t[T0] == pytest.approx(25.0)
    assert t.get(T0 + timedelta(minutes=30), 0.0) == pytest.approx(0.0)


def test_late_reading_recomputes_neighbours() -> None:
    """A late reading between stored ones shortens its predecessor's hold and holds itself."""
    stored = [power(0, 60.0), power(4, 0.0)]
    out = merge([stored[0]], [], [power(2, 0.0)], [stored[1]])
    t = totals(merge([], [], stored).pieces + out.pieces)
    assert t[T0] == pytest.approx(60 * 2 / 60)
    # the predecessor's pieces stay as stored; the new reading has none to delete
    assert set(out.replace) == {stored[1].ts}


def test_block_start_aligns_to_half_hours() -> None:
    """Blocks start on :00 and :30."""
    assert block_start(datetime(2026, 1, 1, 10, 47, 13, tzinfo=UTC)) == datetime(2026, 1, 1, 10, 30, tzinfo=UTC)


def reference_power_pieces(cur: Point, nxt: Point | None) -> list[Piece]:
    """The power rule written out plainly: the hold walked block by block, keys per the 5-minute rule."""
    from bridge.energy import BLOCK, MAX_HOLD, hold_of

    assert cur.power_kw is not None
    own = block_start(cur.ts)
    kwh = {own: 0.0}
    if cur.ts + MAX_HOLD > own + BLOCK:
        kwh[own + BLOCK] = 0.0
    t, end = cur.ts, cur.ts + hold_of(cur, nxt)
    while t < end:
        seg_end = min(block_start(t) + BLOCK, end)
        kwh[block_start(t)] += cur.power_kw * (seg_end - t).total_seconds() / 3600.0
        t = seg_end
    return [Piece(cur.ts, b, v, cur.power_kw if b == own else None, b == own) for b, v in sorted(kwh.items())]


def test_power_pieces_match_the_plain_rule_everywhere_in_a_block() -> None:
    """The fast paths of `pieces` give exactly the plain rule's pieces, at any second of a block and any gap."""
    import random

    rng = random.Random(6)
    for _ in range(3000):
        cur = Point(
            T0 + timedelta(seconds=rng.randrange(0, 3600), microseconds=rng.randrange(10**6)),
            rng.choice([-3.5, 0.0, 7.25, 50.0]),
            None,
            None,
        )
        nxt = (
            None if rng.random() < 0.3 else Point(cur.ts + timedelta(seconds=rng.uniform(0.001, 900)), 1.0, None, None)
        )
        assert pieces(None, cur, nxt, "power") == reference_power_pieces(cur, nxt), (cur, nxt)


def reference_totals(readings: list[Point]) -> dict[datetime, float]:
    """Block kWh written out plainly: every reading's own pieces, with its successor known."""
    seq = sorted({p.ts: p for p in readings}.values(), key=lambda p: p.ts)
    out: dict[datetime, float] = defaultdict(float)
    for i, cur in enumerate(seq):
        for p in pieces(seq[i - 1] if i else None, cur, seq[i + 1] if i + 1 < len(seq) else None):
            out[p.block] += p.kwh
    return dict(out)


class Store:
    """The writer's use of these functions, over a dict for `meter_energy`: cache, look-ups, delete, upsert."""

    def __init__(self) -> None:
        self.readings: dict[datetime, Point] = {}
        self.rows: dict[tuple[datetime, datetime], float] = {}
        self.last: Last | None = None

    def write(self, batch: list[Point]) -> None:
        new = [p for _, p in sorted({p.ts: p for p in batch}.items())]
        if self.last is not None and new[0].ts > self.last.point.ts:
            outcome = extend(self.last, new)
        else:
            stored = sorted(self.readings)
            lo, hi = new[0].ts, new[-1].ts
            outcome = merge(
                [self.readings[t] for t in stored if t < lo][-2:],
                [self.readings[t] for t in stored if lo <= t <= hi],
                new,
                [self.readings[t] for t in stored if t > hi][:2],
            )
        for ts in outcome.replace:
            self.rows = {k: v for k, v in self.rows.items() if k[0] != ts}
        for p in outcome.pieces:
            self.rows[(p.source_ts, p.block)] = p.kwh
        for p in new:
            self.readings.setdefault(p.ts, p)  # ON CONFLICT DO NOTHING
        self.last = outcome.last

    def totals(self) -> dict[datetime, float]:
        out: dict[datetime, float] = defaultdict(float)
        for (_, block), kwh in self.rows.items():
            out[block] += kwh
        return dict(out)


def random_reading(rng: random.Random, ts: datetime) -> Point:
    kind = rng.choice(["power", "power", "power", "register", "interval", "mixed"])
    kw = rng.choice([0.0, 3.5, 50.0, -2.0])
    register = round(rng.uniform(0, 1e4), 3)
    if kind == "power":
        return Point(ts, kw, None, None)
    if kind == "register":
        return Point(ts, None, None, register)
    if kind == "interval":
        return Point(ts, None, rng.uniform(0, 2), None)
    return Point(ts, kw, None, register)


@pytest.mark.parametrize("seed", range(40))
def test_any_arrival_order_gives_the_plain_rules_blocks(seed: int) -> None:
    """Readings in any order, batching and repetition store the block kWh of the plain rule (no rewrites in order)."""
    rng = random.Random(seed)
    ts = T0 + timedelta(minutes=rng.randrange(30))
    readings = []
    for _ in range(rng.randrange(1, 60)):
        ts += timedelta(seconds=rng.choice([0.5, 7, 45, 170, 299, 301, 900, 3000]))
        readings.append(random_reading(rng, ts))
    arrival = list(readings)
    if seed % 2:  # half the runs: late data and repeats
        rng.shuffle(arrival)
        arrival += rng.sample(readings, len(readings) // 3)
    store = Store()
    i = 0
    while i < len(arrival):
        n = rng.randrange(1, 6)
        store.write(arrival[i : i + n])
        i += n
    expected = reference_totals(readings)
    got = store.totals()
    for block in set(expected) | set(got):
        assert got.get(block, 0.0) == pytest.approx(expected.get(block, 0.0), abs=1e-9), (seed, block)


def test_in_order_readings_store_new_keys_only() -> None:
    """In order, a held power reading's successor corrects it with a piece of its own: no key is written twice."""
    first = merge([], [], [power(0), power(1)])
    assert first.last is not None
    later = extend(first.last, [power(m) for m in range(2, 30)])
    keys = [(p.source_ts, p.block) for p in first.pieces + later.pieces]
    assert len(keys) == len(set(keys))
    assert totals(first.pieces + later.pieces)[T0] == pytest.approx(50 * 29 / 60 + 50 * 1 / 60)


def test_late_register_reading_changes_how_the_next_two_count() -> None:
    """A late register reading turns its successor's held power into a register difference; the one after follows."""
    a = Point(T0, 10.0, None, None)
    b = Point(T0 + timedelta(minutes=2), 30.0, None, 500.0)  # power and register: held, without a register before it
    c = Point(T0 + timedelta(minutes=3), 20.0, None, None)
    store = Store()
    store.write([a, b, c])
    assert store.totals() == pytest.approx(reference_totals([a, b, c]))
    late = Point(T0 + timedelta(minutes=1), None, None, 499.0)
    store.write([late])
    assert store.totals() == pytest.approx(reference_totals([a, late, b, c]))


def test_stored_pieces_fast_path_gives_the_general_figures_exactly() -> None:
    """The power meter's cheap path stores bit for bit what the general rule stores, wherever the readings fall."""
    from bridge.energy import _stored_pieces, method_of, stored_pieces

    rng = random.Random(9)
    for _ in range(20000):
        prev = Point(T0 + timedelta(seconds=rng.uniform(0, 3600)), rng.choice([0.0, 7.25, 50.0]), None, None)
        cur = random_reading(rng, prev.ts + timedelta(seconds=rng.choice([0.5, 30, 150, 299, 300, 301, 700])))
        before = rng.choice([None, Point(prev.ts - timedelta(seconds=9), 1.0, None, rng.choice([None, 5.0]))])
        prev_method = method_of(before, prev)
        method = method_of(prev, cur)
        assert stored_pieces(prev, prev_method, cur, method) == _stored_pieces(prev, prev_method, cur, method)
