"""Latest-state tables keep free room in their pages, so their per-batch upserts are HOT updates.

Every batch rewrites one row per reporting device in `meter_latest` (and the other `*_latest` tables)
and in `devices`. None of the updated columns is indexed except `devices.status`, which rarely changes,
so with room on the page PostgreSQL updates in place (heap-only tuples) instead of adding index
entries each time. Applies to pages written from now on; the same on every schema level.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TABLES = ("devices", "meter_latest", "vehicle_latest", "pump_latest", "obis_latest")


def upgrade() -> None:
    for table in TABLES:
        op.execute(f"ALTER TABLE {table} SET (fillfactor = 50)")


def downgrade() -> None:
    for table in TABLES:
        op.execute(f"ALTER TABLE {table} RESET (fillfactor)")
