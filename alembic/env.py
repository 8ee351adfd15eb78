"""Alembic environment: the database comes from DATABASE_URL (or `-x url=…`, used by the tests)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool

from bridge.config import Settings
from bridge.schema import sqlalchemy_url


def run_migrations_online() -> None:
    url = context.get_x_argument(as_dictionary=True).get("url") or Settings.from_env().database_url
    # NullPool: one connection at a time, which is all PGlite serves
    engine = create_engine(sqlalchemy_url(url), poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=None, transactional_ddl=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) mode is not supported: the schema depends on the database's level")
run_migrations_online()
