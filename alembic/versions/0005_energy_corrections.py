"""Energy pieces are insert-only: a held power reading's successor carries its correction (bridge.energy).

Until now the bridge rewrote the newest reading's provisional pieces when the next reading arrived (an
update in place for every power reading); now the next reading's pieces carry the difference. Block
and hour sums are the same either way, but the stored pieces of each reading differ, and the bridge's
handling of late data assumes the new form: this re-derives every meter's pieces from its readings, one
meter at a time. The downgrade re-derives the old form.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from alembic import op

from bridge import energy

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

log = logging.getLogger("alembic.runtime.migration")


def _corrected(seq: list[energy.Point]) -> list[energy.Piece]:
    return energy.merge([], [], seq).pieces


def _rewritten(seq: list[energy.Point]) -> list[energy.Piece]:
    """The old form: every reading's own pieces with its successor known (the newest one's held 5 minutes)."""
    out: list[energy.Piece] = []
    for i, cur in enumerate(seq):
        out += energy.pieces(seq[i - 1] if i else None, cur, seq[i + 1] if i + 1 < len(seq) else None)
    return out


def _rederive(derive: Callable[[list[energy.Point]], list[energy.Piece]]) -> None:
    conn: Any = op.get_bind().connection.driver_connection  # psycopg: whole columns as arrays
    with conn.cursor() as cur:
        cur.execute("SELECT DISTINCT meter_id FROM meter_energy")
        meters = [r[0] for r in cur.fetchall()]
        for n, meter_id in enumerate(meters, 1):
            cur.execute(
                "SELECT ts, power_kw, kwh_consumed_ac, energy_total_kwh FROM meter_readings WHERE meter_id = %s "
                "ORDER BY ts",
                (meter_id,),
            )
            got = derive([energy.Point(*r) for r in cur.fetchall()])
            cur.execute("DELETE FROM meter_energy WHERE meter_id = %s", (meter_id,))
            if got:
                cur.execute(
                    "INSERT INTO meter_energy (meter_id, ts, source_ts, kwh, power_kw, is_reading) "
                    "SELECT %s, * FROM unnest(%s::timestamptz[], %s::timestamptz[], %s::float8[], %s::float8[], "
                    "%s::boolean[])",
                    (
                        meter_id,
                        [p.block for p in got],
                        [p.source_ts for p in got],
                        [p.kwh for p in got],
                        [p.power_kw for p in got],
                        [p.is_reading for p in got],
                    ),
                )
            if n % 1000 == 0:
                log.info("energy pieces re-derived for %d of %d meters", n, len(meters))


def upgrade() -> None:
    _rederive(_corrected)


def downgrade() -> None:
    _rederive(_rewritten)
