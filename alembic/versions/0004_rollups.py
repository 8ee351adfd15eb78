"""Hourly rollups of what `performance/:vehicleId` sums: `vehicle_hours`, `meter_hours`, `rollup_state`.

Plain tables on every schema level, kept by the bridge (bridge/rollups.py explains how they stay
exact); filled here from the raw tables for the last two days.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25
"""

from __future__ import annotations

from alembic import op

from bridge.rollups import REBUILD

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE vehicle_hours (
            vehicle_id text NOT NULL,
            hour timestamptz NOT NULL,
            kwh_dc double precision,
            temp_sum double precision,
            temp_count bigint NOT NULL,
            readings bigint NOT NULL,
            PRIMARY KEY (vehicle_id, hour)
        )
        """
    )
    op.execute(
        """
        CREATE TABLE meter_hours (
            meter_id text NOT NULL,
            hour timestamptz NOT NULL,
            kwh double precision NOT NULL,
            pieces bigint NOT NULL,
            PRIMARY KEY (meter_id, hour)
        )
        """
    )
    op.execute(
        """
        CREATE TABLE rollup_state (
            id smallint PRIMARY KEY DEFAULT 1 CHECK (id = 1),
            closing timestamptz NOT NULL,
            done_until timestamptz NOT NULL
        )
        """
    )
    op.execute("INSERT INTO rollup_state (closing, done_until) VALUES ('-infinity', '-infinity')")
    for sql in REBUILD:
        op.execute(sql)


def downgrade() -> None:
    op.execute("DROP TABLE rollup_state")
    op.execute("DROP TABLE meter_hours")
    op.execute("DROP TABLE vehicle_hours")
