"""Energy pieces: block kWh from registers, interval kWh or held power (no services needed)."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime, timedelta

import pytest

from bridge.energy import Piece, Point, block_start, extend, merge, pieces

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
    out = merge([], [], [power(m) for m in range(30)], None)
    assert totals(out.pieces)[T0] == pytest.approx(25.0)


def test_extend_in_order_equals_merge() -> None:
    """Batches processed in order from the cache give the same blocks as one merge."""
    first = merge([], [], [power(m) for m in range(10)], None)
    assert first.last is not None
    second = extend(first.last, [power(m) for m in range(10, 30)])
    assert totals(first.pieces + second.pieces) == pytest.approx(
        totals(merge([], [], [power(m) for m in range(30)], None).pieces)
    )


def test_power_hold_is_capped_at_five_minutes() -> None:
    """A reading's power holds until the next one, for at most 5 minutes."""
    out = merge([], [], [power(0, 60.0), power(20, 0.0)], None)
    assert totals(out.pieces)[T0] == pytest.approx(5.0)  # 60 kW x 5 min


def test_provisional_hold_spills_into_next_block_and_is_shortened() -> None:
    """The newest reading holds 5 min provisionally; the next reading shortens it with the same keys."""
    first = merge([], [], [power(28)], None)
    assert totals(first.pieces) == pytest.approx({T0: 50 * 2 / 60, T0 + timedelta(minutes=30): 50 * 3 / 60})
    assert first.last is not None
    second = extend(first.last, [power(29)])
    t = totals(first.pieces + second.pieces)
    assert t[T0] == pytest.approx(50 * 2 / 60)
    assert t[T0 + timedelta(minutes=30)] == pytest.approx(50 * 4 / 60)


def test_register_differences_spread_over_blocks() -> None:
    """Register differences are spread over (previous, this] by time."""
    pts = [Point(T0 + timedelta(minutes=20 * i), None, None, 100.0 + 10 * i) for i in range(4)]
    t = totals(merge([], [], pts, None).pieces)
    assert t[T0] == pytest.approx(15.0) and t[T0 + timedelta(minutes=30)] == pytest.approx(15.0)


def test_register_reset_never_goes_negative() -> None:
    """A register that goes down was reset: its new value counts, never a negative difference."""
    pts = [Point(T0, None, None, 1000.0), Point(T0 + timedelta(minutes=10), None, None, 3.0)]
    t = totals(merge([], [], pts, None).pieces)
    assert t[T0] == pytest.approx(3.0)
    assert all(v >= 0 for v in t.values())


def test_interval_kwh_without_previous_lands_in_own_block() -> None:
    """The first interval reading of a meter counts in its own block."""
    t = totals(merge([], [], [Point(T0 + timedelta(minutes=5), None, 2.0, None)], None).pieces)
    assert t[T0] == pytest.approx(2.0)


def test_register_meter_has_no_provisional_power_hold() -> None:
    """A meter with a register and power is counted by register differences only."""
    pts = [Point(T0 + timedelta(minutes=i), 50.0, None, 100.0 + i * 50 / 60) for i in range(31)]
    t = totals(merge([], [], pts, None).pieces)
    assert t[T0] == pytest.approx(25.0)
    assert t.get(T0 + timedelta(minutes=30), 0.0) == pytest.approx(0.0)


def test_late_reading_recomputes_neighbours() -> None:
    """A late reading between stored ones shortens its predecessor's hold and holds itself."""
    stored = [power(0, 60.0), power(4, 0.0)]
    out = merge([stored[0]], [], [power(2, 0.0)], stored[1])
    t = totals(merge([], [], stored, None).pieces + out.pieces)
    assert t[T0] == pytest.approx(60 * 2 / 60)
    assert set(out.replace) == {stored[0].ts, power(2).ts}


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
