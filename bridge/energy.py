"""Energy per 30-minute block, from the best data a meter sends (CONTRACT, "Energy semantics").

Continuous aggregates cannot look at neighbouring rows, so the bridge turns every meter reading into
*pieces*: kWh attributed to the blocks the reading's interval covers. The aggregates then only sum.

- register: the difference to the previous register reading, spread over (previous, this] by time;
  a register that went down was reset, and counts from zero;
- interval: `kwhConsumedAc` spread over (previous, this] the same way;
- power: the reading's kW held until the next reading, for at most 5 minutes.

A power reading's hold depends on a reading that has not arrived yet, so its pieces hold the full 5
minutes *provisionally*, and the next reading's pieces carry the *correction*: the final hold minus the
provisional one, per block (usually negative, in the predecessor's block). Block sums are the same as
if the predecessor's pieces had been rewritten, but nothing stored is ever updated: in order, each
reading is one or two inserted rows (an update in place cost a hypertable more than the insert did, and
rewrites compressed chunks). A reading's pieces therefore depend on its predecessor (and on the one
before that, which decides whether the predecessor's kW was held); late data rewrites the pieces of the
readings after it.

Pieces are keyed (meter, source reading time, block start); rewriting them is idempotent.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Literal, NamedTuple

BLOCK = timedelta(minutes=30)
MAX_HOLD = timedelta(minutes=5)
# A register jump after a longer silence lands in the block of the reading that reports it.
MAX_SPREAD = timedelta(days=7)
_BLOCK_S = 1800
Method = Literal["register", "interval", "power", "none"]


class Point(NamedTuple):  # a tuple: built thousands of times per batch
    ts: datetime
    power_kw: float | None
    kwh_interval: float | None
    register: float | None


class Piece(NamedTuple):  # a tuple: built thousands of times per batch
    source_ts: datetime
    block: datetime
    kwh: float
    power_kw: float | None
    is_reading: bool


# The last block computed, as (start, end): a batch's readings nearly all fall in one block, and two
# comparisons cost a fraction of the conversion. One tuple, replaced whole: safe between threads.
_recent_block = (datetime.max.replace(tzinfo=UTC), datetime.min.replace(tzinfo=UTC))


def block_start(ts: datetime) -> datetime:
    """Start of the 30-minute block holding `ts` (blocks start on :00 and :30 UTC)."""
    global _recent_block
    start, end = _recent_block
    if start <= ts < end:
        return start
    if ts.tzinfo is not UTC:
        ts = ts.astimezone(UTC)
    minute = ts.minute
    start = ts.replace(minute=minute - minute % 30, second=0, microsecond=0)
    _recent_block = (start, start + BLOCK)
    return start


def method_of(prev: Point | None, cur: Point) -> Method:
    if cur.register is not None and prev is not None and prev.register is not None:
        return "register"
    if cur.kwh_interval is not None:
        return "interval"
    if cur.power_kw is not None:
        return "power"
    return "none"


def _spread(start: datetime, end: datetime, kwh: float, into: dict[datetime, float]) -> None:
    span = (end - start).total_seconds()
    if span <= 0 or end - start > MAX_SPREAD:
        into[block_start(end)] = into.get(block_start(end), 0.0) + kwh
        return
    t = start
    while t < end:
        blk = block_start(t)
        seg_end = min(blk + BLOCK, end)
        into[blk] = into.get(blk, 0.0) + kwh * (seg_end - t).total_seconds() / span
        t = seg_end


def hold_of(cur: Point, nxt: Point | None) -> timedelta:
    """How long a power reading's kW counts: until the next reading, at most 5 minutes."""
    if nxt is None:
        # a meter that sends a register will cover this interval from the next register reading
        return timedelta(0) if cur.register is not None else MAX_HOLD
    if method_of(cur, nxt) in ("register", "interval"):
        return timedelta(0)
    return min(nxt.ts - cur.ts, MAX_HOLD)


def pieces(prev: Point | None, cur: Point, nxt: Point | None, method: Method | None = None) -> list[Piece]:
    """The energy of `cur` by blocks, given its neighbours (`nxt` None: the newest reading, hold provisional).

    These are a reading's own figures; what is stored for it is `stored_pieces` (provisional, plus the
    predecessor's correction)."""
    m = method or method_of(prev, cur)
    own = block_start(cur.ts)
    if m == "power":
        assert cur.power_kw is not None
        hold = hold_of(cur, nxt)
        following = own + BLOCK
        kw = cur.power_kw
        end = cur.ts + hold
        if following < end <= following + BLOCK:  # the hold (at most 5 minutes) crosses into the next block
            return [
                Piece(cur.ts, own, kw * (following - cur.ts).total_seconds() / 3600.0, kw, True),
                Piece(cur.ts, following, kw * (end - following).total_seconds() / 3600.0, None, False),
            ]
        if end <= following:  # the usual case, kept cheap: the hold stays in its own block
            out = [Piece(cur.ts, own, kw * hold.total_seconds() / 3600.0 if hold else 0.0, kw, True)]
            if cur.ts + MAX_HOLD > following:
                # every version of this reading's pieces has the same keys, whatever its hold: the
                # next reading's upsert then replaces the provisional piece, even with 0 kWh
                out.append(Piece(cur.ts, following, 0.0, None, False))
            return out
    kwh: dict[datetime, float] = {own: 0.0}
    if m == "register":
        assert prev is not None and prev.register is not None and cur.register is not None
        delta = cur.register - prev.register
        _spread(prev.ts, cur.ts, delta if delta >= 0 else cur.register, kwh)
    elif m == "interval":
        assert cur.kwh_interval is not None
        if prev is None:
            kwh[own] += cur.kwh_interval
        else:
            _spread(prev.ts, cur.ts, cur.kwh_interval, kwh)
    elif m == "power":
        assert cur.power_kw is not None
        kwh.setdefault(own + BLOCK, 0.0)  # the hold crosses into the next block
        t, end = cur.ts, cur.ts + hold_of(cur, nxt)
        while t < end:
            blk = block_start(t)
            seg_end = min(blk + BLOCK, end)
            kwh[blk] = kwh.get(blk, 0.0) + cur.power_kw * (seg_end - t).total_seconds() / 3600.0
            t = seg_end
    return [
        Piece(cur.ts, blk, value, cur.power_kw if blk == own else None, blk == own)
        for blk, value in sorted(kwh.items())
    ]


def correction(prev: Point, prev_method: Method, cur: Point) -> list[tuple[datetime, float]]:
    """kWh per block that `prev`'s provisional pieces are off by, now that `cur` follows it."""
    if prev_method != "power":
        return []  # only a held power reading's pieces depend on its successor
    final, provisional = hold_of(prev, cur), hold_of(prev, None)
    if final == provisional:
        return []
    kw = prev.power_kw
    assert kw is not None
    following = block_start(prev.ts) + BLOCK
    if prev.ts + MAX_HOLD <= following:  # the usual case, kept cheap: both holds stay in its own block
        return [(following - BLOCK, kw * (final - provisional).total_seconds() / 3600.0)]
    # every version of a reading's power pieces has the same blocks, whatever its hold
    held = pieces(None, prev, None, "power")
    return [(a.block, a.kwh - b.kwh) for a, b in zip(pieces(None, prev, cur, "power"), held, strict=True)]


_HELD_S = MAX_HOLD.total_seconds()


def stored_pieces(prev: Point | None, prev_method: Method | None, cur: Point, method: Method) -> list[Piece]:
    """What is stored for `cur`: its provisional pieces plus the correction of its predecessor's."""
    if method == "power" and prev_method == "power" and prev is not None and prev.register is None is cur.register:
        # a power meter's readings in one block, kept cheap: the figures `_stored_pieces` computes, in
        # the same order (bit for bit), without building each version of the predecessor's pieces
        own_block = block_start(cur.ts)
        if prev.ts >= own_block:
            kw, prev_kw = cur.power_kw, prev.power_kw
            assert kw is not None and prev_kw is not None
            following = own_block + BLOCK
            gap = cur.ts - prev.ts  # the predecessor's final hold, if under 5 minutes
            end = cur.ts + MAX_HOLD
            if end <= following:  # both holds inside the block: one piece
                kwh = kw * _HELD_S / 3600.0
                if gap < MAX_HOLD:
                    kwh += prev_kw * (gap - MAX_HOLD).total_seconds() / 3600.0
                return [Piece(cur.ts, own_block, kwh, kw, True)]
            # the provisional hold reaches into the next block (the last 5 minutes of a block)
            kwh = kw * (following - cur.ts).total_seconds() / 3600.0
            spill = kw * (end - following).total_seconds() / 3600.0
            if gap < MAX_HOLD:
                if prev.ts + MAX_HOLD <= following:
                    kwh += prev_kw * (gap - MAX_HOLD).total_seconds() / 3600.0
                else:  # the predecessor's held pieces spilled too; its final hold ends at `cur`
                    kwh += (
                        prev_kw * gap.total_seconds() / 3600.0
                        - prev_kw * (following - prev.ts).total_seconds() / 3600.0
                    )
                    spill += 0.0 - prev_kw * (prev.ts + MAX_HOLD - following).total_seconds() / 3600.0
            return [Piece(cur.ts, own_block, kwh, kw, True), Piece(cur.ts, following, spill, None, False)]
    return _stored_pieces(prev, prev_method, cur, method)


def _stored_pieces(prev: Point | None, prev_method: Method | None, cur: Point, method: Method) -> list[Piece]:
    own = pieces(prev, cur, None, method)
    if prev is None or prev_method is None:
        return own
    for blk, kwh in correction(prev, prev_method, cur):
        for i, p in enumerate(own):
            if p.block == blk:
                own[i] = Piece(p.source_ts, blk, p.kwh + kwh, p.power_kw, p.is_reading)
                break
        else:
            if kwh:
                own.append(Piece(cur.ts, blk, kwh, None, False))
    return own


class Last(NamedTuple):  # a tuple: built thousands of times per batch
    """The newest stored reading of a meter and how its energy was counted."""

    point: Point
    method: Method


class Outcome(NamedTuple):  # a tuple: one per meter and batch
    pieces: list[Piece]
    replace: list[datetime]  # source readings whose old pieces must be deleted first
    last: Last | None  # new cache entry; None: unknown, ask the database next time


def extend(last: Last, new: Sequence[Point]) -> Outcome:
    """In-order readings after the cached newest one: no database look-up, nothing stored is rewritten."""
    out: list[Piece] = []
    prev, prev_method = last.point, last.method
    for cur in new:
        method = method_of(prev, cur)
        out.extend(stored_pieces(prev, prev_method, cur, method))
        prev, prev_method = cur, method
    return Outcome(out, [], Last(prev, prev_method))


def merge(
    before: Sequence[Point], stored: Iterable[Point], new: Iterable[Point], after: Sequence[Point] = ()
) -> Outcome:
    """Readings whose neighbours come from the database (first sight of a meter, late or repeated data).

    `before`: up to two stored readings preceding the batch, oldest first (the newest is the first new
    reading's predecessor, the other decides how that one was counted); `stored`: stored readings within
    the batch's time range; `after`: up to two stored readings past it, oldest first (all three read
    before the batch is stored). The batch's readings and those after it get their pieces (again); the
    ones before keep theirs. `replace` names the stored ones among them: a new reading has no pieces yet.
    """
    by_ts = {p.ts: p for p in new}
    old = {p.ts: p for p in stored}
    by_ts.update(old)  # what is stored wins: a repeat is stored once
    seq = [*before, *(by_ts[t] for t in sorted(by_ts)), *after]
    out: list[Piece] = []
    replace: list[datetime] = []
    methods: list[Method] = []
    first_after = len(seq) - len(after)
    for i, cur in enumerate(seq):
        prev = seq[i - 1] if i else None
        method = method_of(prev, cur)
        methods.append(method)
        if i < len(before):
            continue
        out.extend(stored_pieces(prev, methods[i - 1] if i else None, cur, method))
        if i >= first_after or cur.ts in old:
            replace.append(cur.ts)
    last = None if after else Last(seq[-1], methods[-1])
    return Outcome(out, replace, last)
