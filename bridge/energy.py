"""Energy per 30-minute block, from the best data a meter sends (CONTRACT, "Energy semantics").

Continuous aggregates cannot look at neighbouring rows, so the bridge turns every meter reading into
*pieces*: kWh attributed to the blocks the reading's interval covers. The aggregates then only sum.

- register: the difference to the previous register reading, spread over (previous, this] by time;
  a register that went down was reset, and counts from zero;
- interval: `kwhConsumedAc` spread over (previous, this] the same way;
- power: the reading's kW held until the next reading, for at most 5 minutes. Until the next reading
  arrives, the hold is provisionally the full 5 minutes; the next reading shortens it (and rewrites the
  pieces only when the hold changed). A power reading within 5 minutes of its block's end always has a
  piece in the next block too (possibly 0 kWh), so that the shortening is an upsert of the same keys.

Pieces are keyed (meter, source reading time, block start); rewriting them is idempotent.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
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


def block_start(ts: datetime) -> datetime:
    """Start of the 30-minute block holding `ts` (blocks start on :00 and :30 UTC)."""
    if ts.tzinfo is not UTC:
        ts = ts.astimezone(UTC)
    minute = ts.minute
    return ts.replace(minute=minute - minute % 30, second=0, microsecond=0)


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
    """The pieces of `cur`, given its neighbours (`nxt` None: the newest reading, hold provisional)."""
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


class Last(NamedTuple):  # a tuple: built thousands of times per batch
    """The newest stored reading of a meter and how its energy was counted."""

    point: Point
    method: Method


@dataclass(slots=True)
class Outcome:
    pieces: list[Piece]
    replace: list[datetime]  # source readings whose old pieces must be deleted first
    last: Last | None  # new cache entry; None: unknown, ask the database next time


def extend(last: Last, new: Sequence[Point]) -> Outcome:
    """In-order readings after the cached newest one: no database look-up needed."""
    out: list[Piece] = []
    if last.method == "power" and hold_of(last.point, new[0]) != hold_of(last.point, None):
        # the provisional hold of the newest stored reading changes now that its successor is here
        out.extend(pieces(None, last.point, new[0], "power"))
    prev = last.point
    method: Method = "none"
    for i, cur in enumerate(new):
        nxt = new[i + 1] if i + 1 < len(new) else None
        method = method_of(prev, cur)
        out.extend(pieces(prev, cur, nxt, method))
        prev = cur
    return Outcome(out, [], Last(new[-1], method))


def merge(before: Sequence[Point], stored: Iterable[Point], new: Iterable[Point], after: Point | None) -> Outcome:
    """Readings whose neighbours come from the database (first sight of a meter, late or repeated data).

    `before`: up to two stored readings preceding the batch, oldest first; `stored`: stored readings within
    the batch's time range; `after`: the first stored reading past it.
    """
    by_ts = {p.ts: p for p in new}
    by_ts.update({p.ts: p for p in stored})  # what is stored wins: a repeat is stored once
    middle = [by_ts[t] for t in sorted(by_ts)]
    seq = [*before, *middle] + ([after] if after else [])
    first = 1 if len(before) == 2 else 0  # the oldest context reading only serves its successor
    out: list[Piece] = []
    replace: list[datetime] = []
    last: Last | None = None
    for i in range(first, len(seq)):
        prev = seq[i - 1] if i > 0 else None
        cur = seq[i]
        nxt = seq[i + 1] if i + 1 < len(seq) else None
        method = method_of(prev, cur)
        if after is not None and cur is after and method not in ("register", "interval"):
            continue  # its pieces depend only on its own successor, unchanged here
        out.extend(pieces(prev, cur, nxt, method))
        replace.append(cur.ts)
        if nxt is None:
            last = Last(cur, method)
    return Outcome(out, replace, last)
