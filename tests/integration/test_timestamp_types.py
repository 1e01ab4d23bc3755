"""The coordinator's lag and retention on every timestamp column type a seed-shaped table may have,
and on every value such a column can hold, on real PostgreSQL and SQLite.

Before: a text or integer column on PostgreSQL failed every status read and prune ("operator does
not exist: timestamp with time zone - text"), an infinite timestamp failed the lag ("cannot
subtract infinite timestamps"), and SQLite read an integer epoch as a Julian day."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text

from pool.errors import ConfigError
from pool.store import open_store
from tests.helpers import make_settings

DAY = 86400.0
TABLE = """CREATE TABLE signals (id {id_type}, name VARCHAR(255), value FLOAT, source VARCHAR(255),
                                 timestamp {ts_type}, processed INTEGER DEFAULT 0)"""
ID_TYPES = {"postgresql": "SERIAL PRIMARY KEY", "sqlite": "INTEGER PRIMARY KEY AUTOINCREMENT"}


def iso(day: datetime) -> str:
    return day.strftime("%Y-%m-%dT%H:%M:%SZ")


def epoch(day: datetime) -> str:
    return str(int(day.timestamp()))


# column type -> how a time is written into it (a SQL literal's text)
POSTGRES_TYPES = {
    "timestamptz": lambda d: d.strftime("%Y-%m-%d %H:%M:%S+00"),
    "timestamp": lambda d: d.strftime("%Y-%m-%d %H:%M:%S"),
    "date": lambda d: d.strftime("%Y-%m-%d"),
    "text": iso,
    "varchar(40)": lambda d: d.strftime("%Y-%m-%d %H:%M:%S+00:00"),
    "integer": epoch,
    "bigint": epoch,
    "numeric": lambda d: epoch(d) + ".25",
    "double precision": epoch,
}
# SQLite keeps whatever it is given; the declared type only nudges it (NUMERIC affinity turns
# numeric text into numbers, TEXT affinity numbers into text).
SQLITE_TYPES = {
    "TIMESTAMP iso": ("TIMESTAMP", iso),
    "TIMESTAMP epoch": ("TIMESTAMP", lambda d: int(d.timestamp())),
    "TIMESTAMP real epoch": ("TIMESTAMP", lambda d: d.timestamp() + 0.5),
    "TEXT epoch": ("TEXT", epoch),
    "TEXT iso with offset": ("TEXT", lambda d: (d + timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%S+02:00")),
    "no type, epoch": ("", lambda d: int(d.timestamp())),
}
# Values no time can be read from (or only one past what the payload can represent): the lag is
# unknown and retention keeps the row. '-infinity' or a huge negative epoch is older than any age,
# so it may be pruned.
POSTGRES_UNREADABLE = {
    "timestamptz": ["infinity", "-infinity", "20000-01-01 00:00:00+00", None],
    "timestamp": ["infinity", "-infinity", "20000-01-01 00:00:00", None],
    "date": ["infinity", "-infinity", "20000-01-01", None],
    "text": ["garbage", "infinity", "2024-02-30", "", "1700000000", "0000-01-01", None],
    "varchar(40)": ["2024-13-01T00:00:00", "24:00", None],
    "integer": [None],
    "bigint": ["9223372036854775807", "-9223372036854775808", "999999999999", None],
    "numeric": ["NaN", "Infinity", "-Infinity", "1e400", "-1e400", None],
    "double precision": ["NaN", "Infinity", "-Infinity", "1e300", None],
}
SQLITE_UNREADABLE = ["'garbage'", "'infinity'", "1e300", "-1e300", "9223372036854775807", "x'00ff'", "''",
                     "9e999", "NULL"]


def midnight(days_ago: int) -> datetime:
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return today - timedelta(days=days_ago)


def prepared(url: str, dialect: str, ts_type: str):
    store = open_store(make_settings(db_url=url))
    with store.engine.begin() as conn:
        conn.execute(text(TABLE.format(id_type=ID_TYPES[dialect], ts_type=ts_type)))
    store.init_schema()
    store.check_schema()
    return store


def insert(store, stamp, processed: int) -> int:
    with store.engine.begin() as conn:
        return conn.execute(text(
            "INSERT INTO signals (name, value, source, timestamp, processed)"
            " VALUES ('n', 1.0, 's', :ts, :p) RETURNING id"), {"ts": stamp, "p": processed}).scalar_one()


def insert_literal(store, literal: str, processed: int) -> int:
    with store.engine.begin() as conn:
        return conn.execute(text(
            "INSERT INTO signals (name, value, source, timestamp, processed)"
            f" VALUES ('n', 1.0, 's', {literal}, :p) RETURNING id"), {"p": processed}).scalar_one()


def ids(store) -> set[int]:
    with store.engine.connect() as conn:
        return {r[0] for r in conn.execute(text("SELECT id FROM signals"))}


def check_lag_and_prune(store, write) -> None:
    """A pending row two days old and processed rows 30 days and 0 days old: the lag reads two
    days; pruning at 10 days deletes exactly the old processed ones."""
    insert(store, write(midnight(2)), processed=0)
    old = {insert(store, write(midnight(30)), processed=1) for _ in range(3)}
    insert(store, write(midnight(0)), processed=1)

    stats = store.backlog_stats(store.shard_count())
    assert stats.backlog == 1
    assert stats.oldest_age_seconds is not None
    assert 2 * DAY - 60 <= stats.oldest_age_seconds <= 3 * DAY + 60, stats.oldest_age_seconds

    assert store.count_prunable(10 * DAY) == 3
    before = ids(store)
    assert store.prune_processed(10 * DAY, 100) == 3
    assert ids(store) == before - old


def check_unreadable(store, insert_value, values) -> None:
    """Each value in turn as the oldest pending row and as a processed row: status and prune keep
    working, the lag is unknown, the row is kept."""
    good = insert(store, None, processed=0)  # a later pending row, no timestamp either
    for value in values:
        with store.engine.begin() as conn:
            conn.execute(text("DELETE FROM signals WHERE id <> :g"), {"g": good})
        first = insert_value(value, 0)
        kept = insert_value(value, 1)
        with store.engine.begin() as conn:  # the unreadable row is the lowest pending id
            conn.execute(text("UPDATE signals SET id = :low WHERE id = :id"), {"low": -good, "id": first})
        stats = store.backlog_stats(store.shard_count())
        assert stats.oldest_age_seconds is None, value
        assert stats.backlog == 2, value
        store.count_prunable(0)
        store.prune_processed(0, 100)
        if not str(value).lstrip("'").startswith("-"):  # older than any age: it may go
            assert kept in ids(store), value


@pytest.mark.parametrize("ts_type", POSTGRES_TYPES)
def test_postgres_lag_and_retention_read_every_supported_column_type(pg_url, ts_type):
    store = prepared(pg_url, "postgresql", ts_type)
    try:
        check_lag_and_prune(store, POSTGRES_TYPES[ts_type])
    finally:
        store.close()


@pytest.mark.parametrize("ts_type", SQLITE_TYPES)
def test_sqlite_lag_and_retention_read_texts_and_epoch_numbers(sqlite_url, ts_type):
    declared, write = SQLITE_TYPES[ts_type]
    store = prepared(sqlite_url, "sqlite", declared)
    try:
        check_lag_and_prune(store, write)
    finally:
        store.close()


@pytest.mark.parametrize("ts_type", POSTGRES_UNREADABLE)
def test_postgres_status_and_prune_survive_every_value(pg_url, ts_type):
    store = prepared(pg_url, "postgresql", ts_type)
    try:
        check_unreadable(store, lambda value, processed: insert(store, value, processed),
                         POSTGRES_UNREADABLE[ts_type])
    finally:
        store.close()


@pytest.mark.parametrize("declared", ["TIMESTAMP", "TEXT", ""])
def test_sqlite_status_and_prune_survive_every_value(sqlite_url, declared):
    store = prepared(sqlite_url, "sqlite", declared)
    try:
        check_unreadable(store, lambda value, processed: insert_literal(store, value, processed),
                         SQLITE_UNREADABLE)
    finally:
        store.close()


@pytest.mark.parametrize("ts_type", ["interval", "boolean", "jsonb", "time", "timestamptz[]"])
def test_postgres_refuses_a_column_no_time_can_be_read_from(pg_url, ts_type):
    store = open_store(make_settings(db_url=pg_url))
    try:
        with store.engine.begin() as conn:
            conn.execute(text(TABLE.format(id_type=ID_TYPES["postgresql"], ts_type=ts_type)))
        for check in (store.init_schema, store.check_schema):
            with pytest.raises(ConfigError, match=r"column 'timestamp' of table 'signals' is .*pool reads"
                                                  r" times from timestamptz") as refused:
                check()
            assert "\n" not in str(refused.value)
    finally:
        store.close()


def test_postgres_dead_letters_with_an_infinite_death_time_are_still_listed_and_counted(pg_url):
    # dead_at is the relay's own column, but a hand-edited value must not fail the status read.
    store = prepared(pg_url, "postgresql", "timestamptz")
    try:
        with store.engine.begin() as conn:
            conn.execute(text("INSERT INTO signals (name, value, source, timestamp, dead_at, attempts) VALUES"
                              " ('n', 1, 's', now(), 'infinity', 5), ('n', 1, 's', now(), '-infinity', 5)"))
        assert len(store.list_dead()) == 2
        assert store.backlog_stats(store.shard_count()).dead == 2
        assert store.purge_dead(0) == 0  # no age to go by: kept for `pool dead requeue` or a closer look
    finally:
        store.close()


SEED_TABLE_WITH_ID = ("CREATE TABLE signals (id {id_type} PRIMARY KEY, name TEXT, value DOUBLE PRECISION,"
                      " source TEXT, timestamp TIMESTAMPTZ, processed INTEGER NOT NULL DEFAULT 0)")


@pytest.mark.parametrize("id_type", ["text", "numeric", "numeric(20,2)", "double precision", "uuid"])
def test_postgres_refuses_an_id_column_that_maps_no_row_to_a_shard(pg_url, id_type):
    # A text id failed every claim of the table forever ("operator does not exist: text % smallint");
    # a fractional id lands on no shard, so its row was never relayed.
    store = open_store(make_settings(db_url=pg_url))
    try:
        with store.engine.begin() as conn:
            conn.execute(text(SEED_TABLE_WITH_ID.format(id_type=id_type)))
        for check in (store.init_schema, store.check_schema):
            with pytest.raises(ConfigError, match=r"column 'id' of table 'signals' is .*needs integer ids"):
                check()
    finally:
        store.close()


@pytest.mark.parametrize("id_type", ["smallint", "integer", "bigint", "numeric(20)"])
def test_postgres_takes_an_integer_id_column(pg_url, id_type):
    store = open_store(make_settings(db_url=pg_url))
    try:
        with store.engine.begin() as conn:
            conn.execute(text(SEED_TABLE_WITH_ID.format(id_type=id_type)))
        store.init_schema()
        store.check_schema()
    finally:
        store.close()
