"""Alerts: rules (with built-in defaults), one row per alert episode, and the event log.

Plain tables on every schema level: they are small and updated in place.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TABLES = """
CREATE TABLE alert_rules (
    id bigserial PRIMARY KEY,
    type text NOT NULL CHECK (type IN (
        'low_water', 'sensor_offline', 'pump_protection', 'overcurrent', 'pump_overtime',
        'voltage_out_of_range', 'frequency_out_of_range', 'low_efficiency', 'battery_temp_high',
        'device_offline')),
    device_id text,
    kind text CHECK (kind IN ('meter', 'vehicle', 'pump')),
    target text CHECK (target IN ('ground_tank', 'roof_tank')),
    threshold_low float8,
    threshold_high float8,
    clear_low float8,
    clear_high float8,
    severity text NOT NULL DEFAULT 'warning'
        CHECK (severity IN ('info', 'low', 'warning', 'medium', 'high', 'critical')),
    enabled boolean NOT NULL DEFAULT true,
    builtin boolean NOT NULL DEFAULT false,
    description text,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    CHECK (clear_low IS NULL OR threshold_low IS NOT NULL AND clear_low >= threshold_low),
    CHECK (clear_high IS NULL OR threshold_high IS NOT NULL AND clear_high <= threshold_high),
    CHECK (threshold_low IS NULL OR threshold_high IS NULL OR threshold_low < threshold_high)
);
COMMENT ON TABLE alert_rules IS
    'Raise when the watched value leaves [threshold_low, threshold_high]; resolve once it is back within '
    '[clear_low, clear_high] (each clear bound defaults to its threshold). A rule of a device overrides the '
    'rules of its kind, which override rules for every kind, per (type, target).';
CREATE INDEX alert_rules_device ON alert_rules (device_id) WHERE device_id IS NOT NULL;
CREATE TABLE alerts (
    id bigserial PRIMARY KEY,
    device_id text NOT NULL,
    kind text,
    rule_id bigint NOT NULL,
    type text NOT NULL,
    severity text NOT NULL,
    state text NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'resolved')),
    value float8,
    resolved_value float8,
    message text NOT NULL,
    raised_at timestamptz NOT NULL,
    resolved_at timestamptz,
    acknowledged_at timestamptz,
    acknowledged_by text,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX alerts_one_active ON alerts (device_id, rule_id) WHERE state = 'active';
CREATE INDEX alerts_device_raised ON alerts (device_id, raised_at DESC);
CREATE INDEX alerts_raised ON alerts (raised_at DESC);
CREATE TABLE alert_events (
    id bigserial PRIMARY KEY,
    alert_id bigint NOT NULL REFERENCES alerts (id) ON DELETE CASCADE,
    device_id text NOT NULL,
    kind text,
    rule_id bigint,
    type text NOT NULL,
    severity text NOT NULL,
    event text NOT NULL CHECK (event IN ('raised', 'resolved', 'acknowledged')),
    ts timestamptz NOT NULL,
    value float8,
    message text,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX alert_events_alert ON alert_events (alert_id);
CREATE INDEX alert_events_device_ts ON alert_events (device_id, ts DESC);
CREATE INDEX alert_events_ts ON alert_events (ts DESC);
"""

# The defaults: the PUMP backend's own checks (ground tank critically low below 15 %, roof tank low below
# 20 %, sensors offline, protection, current above its 10 A pump maximum) and the rest of the site's.
DEFAULT_RULES = """
INSERT INTO alert_rules (type, kind, target, threshold_low, threshold_high, clear_low, clear_high, severity,
                         builtin, description) VALUES
    ('low_water', 'pump', 'ground_tank', 15, NULL, 20, NULL, 'critical', true,
     'ground tank level below 15 %, clears above 20 %'),
    ('low_water', 'pump', 'roof_tank', 20, NULL, 25, NULL, 'warning', true,
     'roof tank level below 20 %, clears above 25 %'),
    ('sensor_offline', 'pump', 'ground_tank', NULL, NULL, NULL, NULL, 'high', true,
     'ground tank level sensor disconnected or not working'),
    ('sensor_offline', 'pump', 'roof_tank', NULL, NULL, NULL, NULL, 'high', true,
     'roof tank level sensor disconnected or not working'),
    ('pump_protection', 'pump', NULL, NULL, NULL, NULL, NULL, 'critical', true,
     'pump protection active (dry run, overcurrent or overtime)'),
    ('overcurrent', 'pump', NULL, NULL, 10, NULL, 9, 'critical', true,
     'pump current above 10 A (or the device''s meta pump_max_current), clears 1 A below'),
    ('pump_overtime', 'pump', NULL, NULL, 60, NULL, 60, 'warning', true,
     'pump running for more than 60 minutes'),
    ('voltage_out_of_range', 'meter', NULL, 207, 253, 212, 248, 'warning', true,
     'voltage outside 230 V +-10 %, clears within 212-248 V'),
    ('frequency_out_of_range', 'meter', NULL, 49.5, 50.5, 49.6, 50.4, 'warning', true,
     'frequency outside 49.5-50.5 Hz, clears within 49.6-50.4 Hz'),
    ('low_efficiency', 'vehicle', NULL, 0.85, NULL, 0.88, NULL, 'warning', true,
     '24-hour charging efficiency (DC / AC of correlated meters) below 0.85, clears at 0.88'),
    ('battery_temp_high', 'vehicle', NULL, NULL, 50, NULL, 45, 'high', true,
     'battery temperature above 50 C, clears below 45 C'),
    ('device_offline', NULL, NULL, NULL, NULL, NULL, NULL, 'warning', true,
     'device offline: its will, or silent past the offline timeout')
"""


def upgrade() -> None:
    for statement in TABLES.split(";\n"):
        if statement.strip():
            op.execute(statement)
    op.execute(DEFAULT_RULES)


def downgrade() -> None:
    for table in ("alert_events", "alerts", "alert_rules"):
        op.execute(f"DROP TABLE IF EXISTS {table} CASCADE")
