"""`alembic upgrade head` at each level: plain PostgreSQL, Apache TimescaleDB, full TimescaleDB (PGlite)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from bridge.energy import Point, merge, pieces
from bridge.schema import AGGREGATES, HYPERTABLES, VIEWS

from .conftest import create_database, migrate, query

TABLES = (
    "devices",
    "meter_latest",
    "vehicle_latest",
    "pump_latest",
    "obis_latest",
    "meter_vehicle_correlations",
    "dead_letters",
    "commands",
    "counters",
    "site_settings",
    "schema_info",
)


def relations(url: str) -> set[str]:
    rows = query(
        url,
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = 'public' AND c.relkind IN ('r', 'v', 'm', 'p')",
    )
    return {r[0] for r in rows}


def test_plain_level_builds_tables_and_views(plain_url: str) -> None:
    """Plain PostgreSQL: every table, and the aggregates as plain views of the same names."""
    assert query(plain_url, "SELECT level FROM schema_info") == [("plain",)]
    assert set(TABLES + HYPERTABLES + AGGREGATES + VIEWS) <= relations(plain_url)
    views = {r[0] for r in query(plain_url, "SELECT viewname FROM pg_views WHERE schemaname = 'public'")}
    assert set(AGGREGATES + VIEWS) <= views


def test_apache_level_builds_hypertables(apache_url: str) -> None:
    """Apache TimescaleDB: raw tables are hypertables; aggregates are plain views."""
    assert query(apache_url, "SELECT level FROM schema_info") == [("apache",)]
    hyper = {r[0] for r in query(apache_url, "SELECT hypertable_name FROM timescaledb_information.hypertables")}
    assert hyper == set(HYPERTABLES)
    views = {r[0] for r in query(apache_url, "SELECT viewname FROM pg_views WHERE schemaname = 'public'")}
    assert set(AGGREGATES + VIEWS) <= views


def test_full_level_builds_continuous_aggregates_and_policies(oracle_url: str) -> None:
    """Full TimescaleDB: continuous aggregates with real-time aggregation, refresh/compression/retention jobs."""
    assert query(oracle_url, "SELECT level FROM schema_info") == [("full",)]
    hyper = {
        r[0]
        for r in query(
            oracle_url,
            "SELECT hypertable_name FROM timescaledb_information.hypertables WHERE hypertable_schema = 'public'",
        )
    }
    assert hyper == set(HYPERTABLES)
    caggs = dict(
        query(oracle_url, "SELECT view_name, materialized_only FROM timescaledb_information.continuous_aggregates")
    )
    assert caggs == {name: False for name in AGGREGATES}
    jobs = query(
        oracle_url,
        "SELECT proc_name, hypertable_name FROM timescaledb_information.jobs "
        "WHERE proc_name IN ('policy_refresh_continuous_aggregate', 'policy_compression', "
        "'policy_retention')",
    )
    by_proc: dict[str, int] = {}
    for proc, _ in jobs:
        by_proc[proc] = by_proc.get(proc, 0) + 1
    assert by_proc == {
        "policy_refresh_continuous_aggregate": len(AGGREGATES),
        "policy_compression": len(HYPERTABLES),
        "policy_retention": len(HYPERTABLES),
    }
    assert set(VIEWS) <= relations(oracle_url)


@pytest.mark.parametrize("level", ["plain", "auto"])
def test_downgrade_base_removes_everything_and_upgrade_rebuilds(pg_admin_url: str, level: str) -> None:
    """`alembic downgrade base` leaves no table of ours; upgrading again rebuilds the same schema."""
    url = create_database(pg_admin_url, {"SCHEMA_LEVEL": level})
    built = relations(url)
    migrate(url, "downgrade", "base", env={"SCHEMA_LEVEL": level})
    assert relations(url) == {"alembic_version"}
    migrate(url, "upgrade", "head", env={"SCHEMA_LEVEL": level})
    assert relations(url) == built


def test_latest_state_tables_leave_room_for_in_place_updates(apache_url: str, plain_url: str) -> None:
    """Migration 0003: devices and the *_latest tables have fillfactor 50 (HOT updates per batch)."""
    sql = "SELECT relname, reloptions FROM pg_class WHERE relname = ANY(%s) ORDER BY relname"
    tables = ["devices", "meter_latest", "obis_latest", "pump_latest", "vehicle_latest"]
    for url in (apache_url, plain_url):
        assert query(url, sql, (tables,)) == [(t, ["fillfactor=50"]) for t in tables]


def test_site_settings_come_from_the_environment(pg_admin_url: str) -> None:
    """SITE_TIMEZONE and PEAK_WINDOW at migration time fill site_settings; a bad value names the variable."""
    url = create_database(
        pg_admin_url, {"SCHEMA_LEVEL": "plain", "SITE_TIMEZONE": "America/New_York", "PEAK_WINDOW": "17:00-21:30"}
    )
    rows = query(url, "SELECT timezone, peak_start::text, peak_end::text FROM site_settings")
    assert rows == [("America/New_York", "17:00:00", "21:30:00")]
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute('CREATE DATABASE "t_badsettings"') if not conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = 't_badsettings'"
        ).fetchone() else None
    with pytest.raises(AssertionError, match="PEAK_WINDOW"):
        migrate(url.rsplit("/", 1)[0] + "/t_badsettings", "upgrade", "head", env={"PEAK_WINDOW": "2pm-10pm"})


def test_energy_pieces_migrate_to_corrections_and_back(pg_admin_url: str) -> None:
    """Migration 0005 re-derives stored pieces in the corrected form (same block sums); its downgrade, the old form."""
    url = create_database(pg_admin_url, {"SCHEMA_LEVEL": "apache"})
    migrate(url, "downgrade", "0004", env={"SCHEMA_LEVEL": "apache"})
    t0 = datetime(2026, 11, 20, 13, 0, tzinfo=UTC)
    points = [Point(t0 + timedelta(minutes=m), 6.0 * (m % 4), None, None) for m in range(0, 40, 3)]
    old = [  # what the bridge stored before 0005: each reading's pieces rewritten once its successor came
        p
        for i, cur in enumerate(points)
        for p in pieces(points[i - 1] if i else None, cur, points[i + 1] if i + 1 < len(points) else None)
    ]
    with psycopg.connect(url) as conn:
        for p in points:
            conn.execute(
                "INSERT INTO meter_readings (meter_id, ts, power_kw) VALUES ('mig-1', %s, %s)", (p.ts, p.power_kw)
            )
        for p in old:
            conn.execute(
                "INSERT INTO meter_energy (meter_id, ts, source_ts, kwh, power_kw, is_reading) "
                "VALUES ('mig-1', %s, %s, %s, %s, %s)",
                (p.block, p.source_ts, p.kwh, p.power_kw, p.is_reading),
            )
    rows = "SELECT source_ts, ts, round(kwh::numeric, 9)::float8 FROM meter_energy ORDER BY 1, 2"
    sums = "SELECT ts, round(sum(kwh)::numeric, 9)::float8 FROM meter_energy GROUP BY 1 ORDER BY 1"
    before, before_sums = query(url, rows), query(url, sums)

    migrate(url, "upgrade", "head", env={"SCHEMA_LEVEL": "apache"})
    new = merge([], [], points).pieces
    assert query(url, rows) == sorted((p.source_ts, p.block, round(p.kwh, 9)) for p in new)
    assert query(url, rows) != before
    assert query(url, sums) == before_sums

    migrate(url, "downgrade", "0004", env={"SCHEMA_LEVEL": "apache"})
    assert query(url, rows) == before


def test_counter_shards_sum_back_on_downgrade(pg_admin_url: str) -> None:
    """Migration 0006: a counter is the sum of its shards' rows; its downgrade keeps one row with that sum."""
    url = create_database(pg_admin_url, {"SCHEMA_LEVEL": "plain"})
    with psycopg.connect(url) as conn:
        conn.execute("UPDATE counters SET value = 4 WHERE name = 'messages_received'")
        conn.execute(
            "INSERT INTO counters (name, shard, value) VALUES ('messages_received', 7, 5), ('dead_letters', 9, 2)"
        )
    total = "SELECT name, sum(value)::bigint FROM counters GROUP BY 1 ORDER BY 1"
    assert query(url, total) == [("dead_letters", 2), ("messages_received", 9), ("messages_stored", 0)]
    migrate(url, "downgrade", "0005", env={"SCHEMA_LEVEL": "plain"})
    assert query(url, "SELECT name, value FROM counters ORDER BY 1") == query(url, total)
    migrate(url, "upgrade", "head", env={"SCHEMA_LEVEL": "plain"})
    assert query(url, total) == [("dead_letters", 2), ("messages_received", 9), ("messages_stored", 0)]
