"""Counters in shards: each writing transaction adds to its own row, not to one row every writer locks.

Every batch adds its counts (messages received, stored, dead-lettered) in its transaction. With one row
per counter, each writer waited at that row for the commit of whichever writer had updated it before
(bench, pg_stat_statements: 3.9 ms a batch with one bridge's two writers, 1.7 ms with two shared
bridges). Now a transaction adds to the row of its shard (its backend's pid modulo 64), and a counter is
the sum of its rows (api/pump.py `system_stats`). The same on every schema level.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE counters ADD COLUMN shard smallint NOT NULL DEFAULT 0")
    op.execute("ALTER TABLE counters DROP CONSTRAINT counters_pkey, ADD PRIMARY KEY (name, shard)")


def downgrade() -> None:
    op.execute("CREATE TEMP TABLE counter_sums AS SELECT name, sum(value)::bigint AS value FROM counters GROUP BY name")
    op.execute("DELETE FROM counters")
    op.execute("ALTER TABLE counters DROP CONSTRAINT counters_pkey, DROP COLUMN shard, ADD PRIMARY KEY (name)")
    op.execute("INSERT INTO counters (name, value) SELECT name, value FROM counter_sums")
    op.execute("DROP TABLE counter_sums")
