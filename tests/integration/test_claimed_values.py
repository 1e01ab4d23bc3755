"""What a claim hands the payload, value by value, on the real databases."""

from __future__ import annotations

from datetime import date, datetime

import pytest
from sqlalchemy import text

from pool.store import Unreadable, open_store
from tests.helpers import make_settings


@pytest.fixture
def pg_store(pg_url):
    store = open_store(make_settings(db_url=pg_url))
    store.init_schema()
    yield store
    store.close()


def test_values_the_driver_cannot_read_come_as_unreadable_and_the_rest_of_the_batch_as_usual(pg_store):
    with pg_store.engine.begin() as conn:
        conn.execute(text("ALTER TABLE signals ADD COLUMN day DATE"))
        conn.execute(text(
            "INSERT INTO signals (id, name, value, source, timestamp) VALUES"
            " (1, 'a', 1, 's', '2024-05-01 12:00:00+00'), (2, 'b', 2, 's', 'infinity'),"
            " (3, 'c', 3, 's', '-infinity'), (4, 'd', 4, 's', '10000-01-01 00:00:00+00'),"
            " (5, 'e', 5, 's', '0044-03-15 00:00:00+00 BC'), (6, 'f', 6, 's', '9999-12-31 23:59:59+00')"))
    claim = pg_store.claim("me", 1, 0, 10, 30)
    stamps = {row.id: row.timestamp for row in claim.rows}
    assert [row.id for row in claim.rows] == [1, 2, 3, 4, 5, 6]
    assert isinstance(stamps[1], datetime) and isinstance(stamps[6], datetime)
    assert stamps[2] == Unreadable("infinity", "timestamp too large (after year 10K): 'infinity'")
    assert stamps[3].text == "-infinity" and "too small" in stamps[3].reason
    assert stamps[4].text.startswith("10000-01-01") and stamps[5].text.endswith(" BC")
    assert [row.value for row in claim.rows] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    # The batch stays leased to this claim alone, and the store's connection serves on.
    assert pg_store.claim("other", 1, 0, 10, 30).rows == []
    assert pg_store.ack(claim.lease, [1, 6]) == 2


def test_the_tolerant_read_keeps_every_column_type_as_the_stock_loaders_read_it(pg_store):
    with pg_store.engine.begin() as conn:
        conn.execute(text("ALTER TABLE signals ALTER COLUMN timestamp TYPE DATE"))
        conn.execute(text("INSERT INTO signals (id, name, value, source, timestamp) VALUES"
                          " (1, 'a', 1.5, NULL, '2024-02-29'), (2, 'b', 'NaN', 's', 'infinity')"))
    rows = pg_store.claim("me", 1, 0, 10, 30).rows
    assert rows[0].timestamp == date(2024, 2, 29) and rows[0].source is None
    assert rows[1].value != rows[1].value  # NaN, loaded as a float, for the payload to reject
    assert isinstance(rows[1].timestamp, Unreadable)


def test_sqlite_claims_whole_real_numbers_as_floats(sqlite_url):
    store = open_store(make_settings(db_url=sqlite_url))
    store.init_schema()
    with store.engine.begin() as conn:
        conn.execute(text("INSERT INTO signals (id, name, value, source, timestamp) VALUES"
                          " (1, 'a', 5, 's', '2024-01-01'), (2, 'b', 0, 's', '2024-01-01'),"
                          " (3, 'c', 2.5, 's', '2024-01-01')"))
    try:
        values = [(row.value, type(row.value)) for row in store.claim("me", 1, 0, 10, 30).rows]
    finally:
        store.close()
    # What a SELECT of the row gives; RETURNING gave 5 and 0, integers.
    assert values == [(5.0, float), (0.0, float), (2.5, float)]


def test_a_client_encoding_from_the_environment_cannot_block_a_shard(pg_url, monkeypatch):
    # With LATIN1 the server could not send the snowman: every claim of its shard failed, rolled back.
    monkeypatch.setenv("PGCLIENTENCODING", "LATIN1")
    store = open_store(make_settings(db_url=pg_url))
    store.init_schema()
    try:
        with store.engine.begin() as conn:
            conn.execute(text("INSERT INTO signals (id, name, value, source) VALUES (1, U&'\\2603', 1, 's')"))
        assert [row.name for row in store.claim("me", 1, 0, 10, 30).rows] == ["\u2603"]
    finally:
        store.close()

