"""The writer's bulk-packed binary arrays read back from PostgreSQL as the values they were made of."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import psycopg
import pytest

from bridge import arrays

NOW = datetime.now(UTC)

CASES = [
    (arrays.Floats([1.5, None, -2.25e300, 5]), "float8[]"),
    (arrays.Floats([0.1, 2.0]), "float8[]"),
    (arrays.Floats([]), "float8[]"),
    (
        arrays.Stamps([NOW, None, datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)]),
        "timestamptz[]",
    ),
    (arrays.Stamps([NOW.astimezone(ZoneInfo("Asia/Kathmandu")), NOW]), "timestamptz[]"),
    (arrays.Texts(["a", None, 'q"uo,te{}', "ünï", ""]), "text[]"),
    (arrays.Texts([]), "text[]"),
    (arrays.Bools([True, None, False]), "boolean[]"),
    (arrays.Bools([False]), "boolean[]"),
]


@pytest.mark.parametrize(("column", "sql_type"), CASES)
def test_round_trip(apache_url: str, column: list[object], sql_type: str) -> None:
    """Each column type, with and without NULLs, empty too, comes back equal."""
    with psycopg.connect(apache_url, autocommit=True) as conn:
        arrays.register(conn)
        row = conn.execute(f"SELECT %b::{sql_type}", (column,)).fetchone()
    assert row is not None and row[0] == list(column)


def test_columns_types_each_column(apache_url: str) -> None:
    """columns() turns rows into typed columns that unnest back into the same rows."""
    rows = [("m1", NOW, 1.0, True), ("m2", NOW, None, None)]
    cols = arrays.columns(rows, "tsfb")
    assert [type(c) for c in cols] == [arrays.Texts, arrays.Stamps, arrays.Floats, arrays.Bools]
    assert arrays.columns([], "tf") == [[], []]
    with psycopg.connect(apache_url, autocommit=True) as conn:
        arrays.register(conn)
        back = conn.execute(
            "SELECT * FROM unnest(%b::text[], %b::timestamptz[], %b::float8[], %b::boolean[])", cols
        ).fetchall()
    assert back == rows
