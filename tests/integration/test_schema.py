"""`pool init-db` on real PostgreSQL and SQLite: fresh tables, seed-shaped tables, idempotence."""

from __future__ import annotations

import pytest
from sqlalchemy import inspect, text

from pool.config import RELAY_COLUMNS
from pool.store import open_store
from tests.helpers import make_settings

SEED_SHAPED = """
CREATE TABLE signals (
    id {id_type},
    name VARCHAR(255),
    value FLOAT,
    source VARCHAR(255),
    timestamp TIMESTAMP,
    processed INTEGER DEFAULT 0
)"""
ID_TYPES = {"postgresql": "SERIAL PRIMARY KEY", "sqlite": "INTEGER PRIMARY KEY AUTOINCREMENT"}


@pytest.fixture(params=["postgresql", "sqlite"])
def db_url(request) -> str:
    return request.getfixturevalue("pg_url" if request.param == "postgresql" else "sqlite_url")


def schema_snapshot(store) -> tuple:
    inspector = inspect(store.engine)
    columns = tuple(sorted((c["name"], str(c["type"]), c["nullable"], str(c["default"]))
                           for c in inspector.get_columns("signals")))
    indexes = tuple(sorted(i["name"] for i in inspector.get_indexes("signals")))
    return columns, indexes


def test_init_db_creates_the_table_and_a_second_run_changes_nothing(db_url):
    store = open_store(make_settings(db_url=db_url))
    try:
        first = store.init_schema()
        assert first.created_table
        assert first.created_indexes == ("signals_pool_pending", "signals_pool_dead")
        snapshot = schema_snapshot(store)
        second = store.init_schema()
        assert not second.changed
        assert schema_snapshot(store) == snapshot
        store.check_schema()
    finally:
        store.close()


def test_init_db_takes_over_a_seed_shaped_table_without_touching_its_rows(db_url):
    store = open_store(make_settings(db_url=db_url))
    try:
        with store.engine.begin() as conn:
            conn.execute(text(SEED_SHAPED.format(id_type=ID_TYPES[store.dialect_name])))
            for i in range(1, 51):
                conn.execute(
                    text("INSERT INTO signals (name, value, source, timestamp, processed)"
                         " VALUES (:n, :v, 'sensor', '2026-01-02 03:04:05', :p)"),
                    {"n": f"s{i}", "v": i * 1.5, "p": 1 if i <= 10 else 0},
                )
            before = conn.execute(text("SELECT * FROM signals ORDER BY id")).all()

        changes = store.init_schema()
        assert not changes.created_table
        assert set(changes.added_columns) == set(RELAY_COLUMNS)
        assert "dead_at" in RELAY_COLUMNS and "lease_token" in RELAY_COLUMNS
        store.check_schema()
        with store.engine.connect() as conn:
            after = conn.execute(
                text("SELECT id, name, value, source, timestamp, processed FROM signals ORDER BY id")
            ).all()
        assert [tuple(r) for r in after] == [tuple(r) for r in before]
        assert not store.init_schema().changed

        claim = store.claim("t", 1, 0, 100, 30)
        assert [r.id for r in claim.rows] == list(range(11, 51))
        assert store.counts().unprocessed == 40
    finally:
        store.close()


def test_check_schema_names_what_is_missing(db_url):
    from pool.errors import ConfigError

    store = open_store(make_settings(db_url=db_url))
    try:
        with pytest.raises(ConfigError, match="(not found|does not exist).*pool init-db"):
            store.check_schema()
        with store.engine.begin() as conn:
            conn.execute(text(SEED_SHAPED.format(id_type=ID_TYPES[store.dialect_name])))
        with pytest.raises(ConfigError, match="lacks column.*lease_owner"):
            store.check_schema()
    finally:
        store.close()


def test_table_names_differing_only_in_case_are_one_table_on_sqlite_and_two_on_postgresql(db_url):
    lower = open_store(make_settings(db_url=db_url, table="signals"))
    upper = open_store(make_settings(db_url=db_url, table="Signals"))
    try:
        lower.init_schema()
        # SQLite: the same table, its indexes and shard tables found whatever the spelling (they
        # were looked up case-sensitively, and a second init-db failed: "index already exists").
        # PostgreSQL: a table of its own, with indexes and shard tables of its own.
        changes = upper.init_schema()
        upper.check_schema()
        if upper.dialect_name == "sqlite":
            assert not changes.changed
        else:
            assert changes.created_table
            assert changes.created_indexes == ("Signals_pool_pending", "Signals_pool_dead")
            assert set(upper.shard_table_names()).isdisjoint(lower.shard_table_names())
    finally:
        lower.close()
        upper.close()
