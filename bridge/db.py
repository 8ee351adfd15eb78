"""The bridge's one database connection, reconnected on demand.

One connection, not a pool: the bridge is a single sequential writer, and PGlite (the full-TimescaleDB
test oracle) serves one connection at a time.
"""

from __future__ import annotations

import logging
from types import TracebackType

import psycopg

from . import arrays
from .errors import DatabaseUnavailable
from .schema import libpq_url

log = logging.getLogger(__name__)


class Database:
    def __init__(self, url: str, *, connect_timeout: float = 5.0) -> None:
        self._url = libpq_url(url)
        self._timeout = connect_timeout
        self._conn: psycopg.AsyncConnection | None = None
        self.reconnects = 0

    async def __aenter__(self) -> Database:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def connection(self) -> psycopg.AsyncConnection:
        if self._conn is not None and not self._conn.closed and not self._conn.broken:
            return self._conn
        if self._conn is not None:
            self.reconnects += 1
            await self.close()
        try:
            self._conn = await psycopg.AsyncConnection.connect(
                self._url,
                connect_timeout=max(1, int(self._timeout)),
                autocommit=True,
                # never prepare: after 5 runs PostgreSQL switches a prepared statement to a generic plan,
                # which made the batch's device upsert ~10x slower (bench/RESULTS.md)
                prepare_threshold=None,
            )
        except psycopg.OperationalError as exc:
            raise DatabaseUnavailable(f"cannot connect to the database: {exc}".strip()) from exc
        arrays.register(self._conn)
        return self._conn

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await conn.close()
            except psycopg.Error as exc:  # closing a broken connection may fail; it is gone either way
                log.debug("closing the database connection: %s", exc)
