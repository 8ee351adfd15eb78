"""meter_latest keeps the reading it held before its last update (`prev_*`).

A bridge on a shared subscription has no cache of each meter's newest reading: the other bridges store
the same meters' readings. Its batch used to lock its meters (an advisory lock each), read their newest
readings from `meter_latest`, then upsert `meter_latest`: three statements (bench, pg_stat_statements:
4.5 + 12.4 + 9.9 ms a batch of ~2,000 readings). Now the upsert inside the readings' statement (as one
bridge has it) does all three: its row lock is the meter's lock, and `prev_* = l.*` in the same SET
hands back, in RETURNING, the newest reading as it was when the lock was granted. Between updates the
columns only record what the row held before the last one. The same on every schema level.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07
"""

from __future__ import annotations

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

COLUMNS = ("prev_ts timestamptz", "prev_power_kw float8", "prev_kwh_consumed_ac float8", "prev_energy_total_kwh float8")


def upgrade() -> None:
    op.execute("ALTER TABLE meter_latest " + ", ".join(f"ADD COLUMN {c}" for c in COLUMNS))


def downgrade() -> None:
    op.execute("ALTER TABLE meter_latest " + ", ".join(f"DROP COLUMN {c.split()[0]}" for c in COLUMNS))
