"""What the schema is made of, independent of the level it was built at.

`alembic upgrade head` detects the level once (full TimescaleDB, Apache TimescaleDB, plain PostgreSQL)
and records it in `schema_info`; reads only use the stable relation names below.
"""

from __future__ import annotations

import logging
from typing import Literal

from sqlalchemy import Connection, text

log = logging.getLogger(__name__)

Level = Literal["full", "apache", "plain"]

HYPERTABLES = ("meter_readings", "meter_energy", "vehicle_readings", "pump_status", "obis_readings", "pump_events")
# Continuous aggregates on the full level, plain views of the same names elsewhere.
AGGREGATES = ("meter_energy_30m", "meter_energy_1h", "vehicle_energy_1h", "pump_stats_1h")
# Views over the aggregates, the same on every level.
VIEWS = ("meter_blocks_30m", "vehicle_efficiency_24h")
# A counter (`messages_received`, …) is the sum of its shards' rows: each writing backend adds to its own
# (migration 0006).
COUNTER_TOTAL = "SELECT coalesce(sum(value), 0)::bigint FROM counters WHERE name = %s"


def detect_level(conn: Connection, wanted: str = "auto") -> Level:
    """The best level this database offers (or `wanted`, checked); creates the extension if it can."""
    available = conn.execute(text("SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'")).first()
    if wanted == "plain" or (wanted == "auto" and available is None):
        return "plain"
    if available is None:
        raise RuntimeError(f"SCHEMA_LEVEL={wanted} but the timescaledb extension is not available")
    created = conn.execute(text("SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'")).first()
    preload = conn.execute(text("SELECT current_setting('shared_preload_libraries', true)")).scalar() or ""
    if created is None and "timescaledb" not in preload and not _is_pglite(conn):
        if wanted != "auto":
            raise RuntimeError("timescaledb is installed but not in shared_preload_libraries")
        # creating it now would end the session with a FATAL error; plain PostgreSQL still works
        log.warning("timescaledb is available but not preloaded; building the plain schema")
        return "plain"
    conn.execute(text("CREATE EXTENSION IF NOT EXISTS timescaledb"))
    license_ = conn.execute(text("SELECT current_setting('timescaledb.license', true)")).scalar()
    level: Level = "full" if license_ == "timescale" else "apache"
    if wanted == "full" and level != "full":
        raise RuntimeError("SCHEMA_LEVEL=full but this TimescaleDB is the Apache-only build")
    if wanted == "apache":
        return "apache"
    return level


def _is_pglite(conn: Connection) -> bool:
    """PGlite (WASM) loads its bundled extensions itself, without shared_preload_libraries."""
    data_dir = conn.execute(text("SELECT current_setting('data_directory', true)")).scalar() or ""
    return str(data_dir).startswith("/tmp/pglite/")


def recorded_level(conn: Connection) -> Level:
    return conn.execute(text("SELECT level FROM schema_info")).scalar_one()


def sqlalchemy_url(url: str) -> str:
    """SQLAlchemy wants the driver named; psycopg takes the plain libpq URL."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def libpq_url(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)
