"""Initial schema at the level the database offers: full TimescaleDB, Apache TimescaleDB or plain.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

from alembic import op
from sqlalchemy import text

from bridge.config import Settings, environment
from bridge.schema import AGGREGATES, HYPERTABLES, VIEWS, Level, detect_level

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TABLES = """
CREATE TABLE schema_info (
    id boolean PRIMARY KEY DEFAULT true CHECK (id),
    level text NOT NULL CHECK (level IN ('full', 'apache', 'plain')),
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE site_settings (
    id boolean PRIMARY KEY DEFAULT true CHECK (id),
    timezone text NOT NULL DEFAULT 'UTC',
    peak_start time NOT NULL DEFAULT '14:00',
    peak_end time NOT NULL DEFAULT '22:00'
);
CREATE TABLE devices (
    device_id text PRIMARY KEY,
    kind text NOT NULL CHECK (kind IN ('meter', 'vehicle', 'pump')),
    status text NOT NULL DEFAULT 'online' CHECK (status IN ('online', 'offline')),
    first_seen timestamptz NOT NULL DEFAULT now(),
    last_seen timestamptz NOT NULL DEFAULT now(),
    status_changed_at timestamptz NOT NULL DEFAULT now(),
    expected_interval_s real,
    name text,
    meta jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX devices_kind_status ON devices (kind, status);
CREATE TABLE meter_readings (
    meter_id text NOT NULL,
    ts timestamptz NOT NULL,
    power_kw float8,
    kwh_consumed_ac float8,
    energy_total_kwh float8,
    voltage float8,
    current float8,
    frequency float8,
    power_factor float8,
    received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (meter_id, ts)
);
CREATE TABLE meter_energy (
    meter_id text NOT NULL,
    ts timestamptz NOT NULL,
    source_ts timestamptz NOT NULL,
    kwh float8 NOT NULL,
    power_kw float8,
    is_reading boolean NOT NULL,
    PRIMARY KEY (meter_id, source_ts, ts)
);
COMMENT ON TABLE meter_energy IS
    'kWh of each meter reading attributed to the 30-minute blocks (ts = block start) its interval covers';
CREATE TABLE vehicle_readings (
    vehicle_id text NOT NULL,
    ts timestamptz NOT NULL,
    soc float8,
    kwh_delivered_dc float8,
    battery_temp float8,
    received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (vehicle_id, ts)
);
CREATE TABLE pump_status (
    device_id text NOT NULL,
    ts timestamptz NOT NULL,
    ground_level_percent float8,
    ground_level_inches float8,
    ground_alarm_active boolean,
    ground_connected boolean,
    ground_sensor_working boolean,
    ground_water_supply_on boolean,
    roof_level_percent float8,
    roof_level_inches float8,
    roof_alarm_active boolean,
    roof_connected boolean,
    roof_sensor_working boolean,
    roof_water_supply_on boolean,
    pump_running boolean NOT NULL,
    pump_manual_override boolean,
    pump_current_amps float8,
    pump_power_watts float8,
    pump_daily_consumption float8,
    pump_hourly_consumption float8,
    pump_runtime_minutes float8,
    pump_total_runtime_hours float8,
    pump_protection_active boolean,
    pump_overcurrent_protection boolean,
    pump_overtime_protection boolean,
    auto_mode_enabled boolean,
    manual_pump_control boolean,
    water_supply_active boolean,
    received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (device_id, ts)
);
CREATE TABLE obis_readings (
    meter_id text NOT NULL,
    ts timestamptz NOT NULL,
    obis_code text NOT NULL,
    value float8 NOT NULL,
    raw_value float8 NOT NULL,
    scaler smallint NOT NULL DEFAULT 0,
    unit text,
    quality text,
    received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (meter_id, obis_code, ts)
);
CREATE TABLE pump_events (
    device_id text NOT NULL,
    ts timestamptz NOT NULL,
    event text NOT NULL,
    payload jsonb NOT NULL DEFAULT '{}',
    received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (device_id, ts, event)
);
CREATE TABLE meter_latest (
    meter_id text PRIMARY KEY,
    ts timestamptz NOT NULL,
    power_kw float8,
    kwh_consumed_ac float8,
    energy_total_kwh float8,
    voltage float8,
    current float8,
    frequency float8,
    power_factor float8,
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE vehicle_latest (
    vehicle_id text PRIMARY KEY,
    ts timestamptz NOT NULL,
    soc float8,
    kwh_delivered_dc float8,
    battery_temp float8,
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE pump_latest (
    device_id text PRIMARY KEY,
    ts timestamptz NOT NULL,
    status jsonb NOT NULL,
    pump_running boolean,
    ground_level_percent float8,
    roof_level_percent float8,
    ground_sensor_working boolean,
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE obis_latest (
    meter_id text NOT NULL,
    obis_code text NOT NULL,
    ts timestamptz NOT NULL,
    value float8 NOT NULL,
    raw_value float8 NOT NULL,
    scaler smallint NOT NULL DEFAULT 0,
    unit text,
    quality text,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (meter_id, obis_code)
);
CREATE TABLE meter_vehicle_correlations (
    vehicle_id text NOT NULL,
    meter_id text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (vehicle_id, meter_id)
);
CREATE INDEX correlations_meter ON meter_vehicle_correlations (meter_id);
CREATE TABLE dead_letters (
    id bigserial PRIMARY KEY,
    received_at timestamptz NOT NULL DEFAULT now(),
    topic text NOT NULL,
    device_id text,
    payload bytea NOT NULL,
    reason text NOT NULL
);
CREATE INDEX dead_letters_received_at ON dead_letters (received_at);
CREATE TABLE commands (
    command_id text PRIMARY KEY,
    device_id text NOT NULL,
    kind text NOT NULL,
    command text NOT NULL,
    payload jsonb NOT NULL DEFAULT '{}',
    status text NOT NULL DEFAULT 'queued'
        CHECK (status IN ('queued', 'sent', 'acked', 'failed', 'expired')),
    result jsonb,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz
);
CREATE INDEX commands_device ON commands (device_id, created_at);
CREATE TABLE counters (
    name text PRIMARY KEY,
    value bigint NOT NULL DEFAULT 0
);
INSERT INTO counters (name) VALUES ('messages_received'), ('messages_stored'), ('dead_letters');
"""

# One SELECT per aggregate; {bucket_30m} / {bucket_1h} become time_bucket or date_bin by level.
AGGREGATE_QUERIES = {
    "meter_energy_30m": """
        SELECT meter_id, {bucket_30m} AS bucket,
               sum(kwh) AS kwh,
               count(*) FILTER (WHERE is_reading) AS reading_count,
               avg(power_kw) AS avg_kw,
               max(power_kw) AS max_kw
        FROM meter_energy GROUP BY meter_id, {bucket_30m}""",
    "meter_energy_1h": """
        SELECT meter_id, {bucket_1h} AS bucket, sum(kwh) AS kwh,
               count(*) FILTER (WHERE is_reading) AS reading_count
        FROM meter_energy GROUP BY meter_id, {bucket_1h}""",
    "vehicle_energy_1h": """
        SELECT vehicle_id, {bucket_1h} AS bucket,
               coalesce(sum(kwh_delivered_dc), 0) AS kwh_dc,
               sum(battery_temp) AS battery_temp_sum,
               count(battery_temp) AS battery_temp_count,
               avg(soc) AS avg_soc,
               count(*) AS record_count
        FROM vehicle_readings GROUP BY vehicle_id, {bucket_1h}""",
    "pump_stats_1h": """
        SELECT device_id, {bucket_1h} AS bucket,
               count(*) AS samples,
               count(*) FILTER (WHERE pump_running) AS running_samples,
               avg(ground_level_percent) AS avg_ground_level,
               min(ground_level_percent) AS min_ground_level,
               max(ground_level_percent) AS max_ground_level,
               avg(roof_level_percent) AS avg_roof_level,
               min(roof_level_percent) AS min_roof_level,
               max(roof_level_percent) AS max_roof_level,
               avg(pump_current_amps) AS avg_current_amps,
               max(pump_current_amps) AS max_current_amps,
               max(pump_power_watts) AS max_power_watts
        FROM pump_status GROUP BY device_id, {bucket_1h}""",
}

BUCKETS: dict[Level, dict[str, str]] = {
    "full": {"bucket_30m": "time_bucket(INTERVAL '30 minutes', ts)", "bucket_1h": "time_bucket(INTERVAL '1 hour', ts)"},
    "apache": {
        "bucket_30m": "time_bucket(INTERVAL '30 minutes', ts)",
        "bucket_1h": "time_bucket(INTERVAL '1 hour', ts)",
    },
    "plain": {
        "bucket_30m": "date_bin(INTERVAL '30 minutes', ts, TIMESTAMPTZ '2000-01-01 00:00:00+00')",
        "bucket_1h": "date_bin(INTERVAL '1 hour', ts, TIMESTAMPTZ '2000-01-01 00:00:00+00')",
    },
}

SEGMENT_BY = {
    "meter_readings": "meter_id",
    "meter_energy": "meter_id",
    "vehicle_readings": "vehicle_id",
    "pump_status": "device_id",
    "obis_readings": "meter_id, obis_code",
    "pump_events": "device_id",
}

# Peak per CONTRACT: the block's start, read in the site's zone, lies in the peak window.
VIEW_QUERIES = {
    "meter_blocks_30m": """
        SELECT b.meter_id,
               b.bucket AS block_start,
               b.bucket + INTERVAL '30 minutes' AS block_end,
               round(b.kwh::numeric, 6)::float8 AS total_kwh,
               b.reading_count,
               round(b.avg_kw::numeric, 6)::float8 AS avg_kw,
               round(b.max_kw::numeric, 6)::float8 AS max_kw,
               CASE WHEN s.peak_start <= s.peak_end
                    THEN (b.bucket AT TIME ZONE s.timezone)::time >= s.peak_start
                         AND (b.bucket AT TIME ZONE s.timezone)::time < s.peak_end
                    ELSE (b.bucket AT TIME ZONE s.timezone)::time >= s.peak_start
                         OR (b.bucket AT TIME ZONE s.timezone)::time < s.peak_end
               END AS is_peak
        FROM meter_energy_30m b CROSS JOIN site_settings s""",
    # The last 24 hours are the current hour and the 23 before it.
    "vehicle_efficiency_24h": """
        WITH dc AS (
            SELECT vehicle_id,
                   sum(kwh_dc) AS kwh_dc,
                   sum(battery_temp_sum) / nullif(sum(battery_temp_count), 0) AS avg_battery_temp,
                   sum(record_count)::bigint AS record_count
            FROM vehicle_energy_1h
            WHERE bucket >= date_trunc('hour', now()) - INTERVAL '23 hours'
            GROUP BY vehicle_id
        ), ac AS (
            SELECT c.vehicle_id, sum(m.kwh) AS kwh_ac
            FROM meter_vehicle_correlations c
            JOIN meter_energy_1h m ON m.meter_id = c.meter_id
            WHERE m.bucket >= date_trunc('hour', now()) - INTERVAL '23 hours'
            GROUP BY c.vehicle_id
        )
        SELECT coalesce(dc.vehicle_id, ac.vehicle_id) AS vehicle_id,
               round(coalesce(ac.kwh_ac, 0)::numeric, 6)::float8 AS kwh_ac,
               round(coalesce(dc.kwh_dc, 0)::numeric, 6)::float8 AS kwh_dc,
               CASE WHEN ac.kwh_ac > 0 THEN round((dc.kwh_dc / ac.kwh_ac)::numeric, 6)::float8 END
                   AS efficiency_ratio,
               dc.avg_battery_temp,
               coalesce(dc.record_count, 0) AS record_count
        FROM dc FULL JOIN ac ON ac.vehicle_id = dc.vehicle_id""",
}


def _interval(name: str, default: str) -> str:
    value = environment().get(name) or default
    # a value of ours goes into DDL: keep it to "<number> <unit>"
    number, _, unit = value.partition(" ")
    if not number.isdigit() or unit.rstrip("s") not in ("minute", "hour", "day", "week", "month", "year"):
        raise RuntimeError(f"{name}: expected e.g. '7 days', got {value!r}")
    return value


def upgrade() -> None:
    settings = Settings.from_env()
    bind = op.get_bind()
    level = detect_level(bind, settings.schema_level)
    for statement in TABLES.split(";\n"):
        if statement.strip():
            op.execute(statement)
    bind.execute(text("INSERT INTO schema_info (level) VALUES (:level)"), {"level": level})
    bind.execute(
        text("INSERT INTO site_settings (timezone, peak_start, peak_end) VALUES (:tz, :start, :end)"),
        {"tz": settings.site_timezone.key, "start": settings.peak_window.start, "end": settings.peak_window.end},
    )
    if level != "plain":
        for table in HYPERTABLES:
            op.execute(f"SELECT create_hypertable('{table}', by_range('ts', INTERVAL '1 day'))")
    for name in AGGREGATES:
        query = AGGREGATE_QUERIES[name].format(**BUCKETS[level])
        if level == "full":
            op.execute(
                f"CREATE MATERIALIZED VIEW {name} "
                "WITH (timescaledb.continuous, timescaledb.materialized_only = false) "
                f"AS {query} WITH NO DATA"
            )
            op.execute(
                f"SELECT add_continuous_aggregate_policy('{name}', start_offset => INTERVAL '30 days', "
                "end_offset => INTERVAL '1 minute', schedule_interval => INTERVAL '5 minutes')"
            )
        else:
            op.execute(f"CREATE VIEW {name} AS {query}")
    for name in VIEWS:
        op.execute(f"CREATE VIEW {name} AS {VIEW_QUERIES[name]}")
    if level == "full":
        compress_after = _interval("COMPRESS_AFTER", "7 days")
        keep_raw = _interval("RAW_RETENTION", "365 days")
        for table in HYPERTABLES:
            op.execute(
                f"ALTER TABLE {table} SET (timescaledb.compress, "
                f"timescaledb.compress_segmentby = '{SEGMENT_BY[table]}')"
            )
            op.execute(f"SELECT add_compression_policy('{table}', INTERVAL '{compress_after}')")
            op.execute(f"SELECT add_retention_policy('{table}', INTERVAL '{keep_raw}')")


def downgrade() -> None:
    bind = op.get_bind()
    level: str = bind.execute(text("SELECT level FROM schema_info")).scalar_one()
    for name in VIEWS:
        op.execute(f"DROP VIEW IF EXISTS {name}")
    for name in AGGREGATES:
        kind = "MATERIALIZED VIEW" if level == "full" else "VIEW"
        op.execute(f"DROP {kind} IF EXISTS {name} CASCADE")
    for table in (
        "counters",
        "commands",
        "dead_letters",
        "meter_vehicle_correlations",
        "obis_latest",
        "pump_latest",
        "vehicle_latest",
        "meter_latest",
        *HYPERTABLES,
        "devices",
        "site_settings",
        "schema_info",
    ):
        op.execute(f"DROP TABLE IF EXISTS {table} CASCADE")
