"""Retention on real PostgreSQL and SQLite: which rows go, bounded batches, the database clock."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from urllib.parse import quote

import pytest
from sqlalchemy import text

from pool.retention import Pruner
from pool.store import open_store
from tests.helpers import make_settings

HOUR = 3600.0


# An old seed table as it was before `pool init-db`: naive times, and NULL allowed.
SEED_SHAPED = """CREATE TABLE signals (id {id_type}, name VARCHAR(255), value FLOAT, source VARCHAR(255),
                                    timestamp TIMESTAMP, processed INTEGER DEFAULT 0)"""
ID_TYPES = {"postgresql": "SERIAL PRIMARY KEY", "sqlite": "INTEGER PRIMARY KEY AUTOINCREMENT"}


def open_prepared(request, dialect: str, seed_shaped: bool, url_suffix: str = ""):
    url = request.getfixturevalue("pg_url" if dialect == "postgresql" else "sqlite_url")
    store = open_store(make_settings(db_url=url + url_suffix))
    if seed_shaped:
        with store.engine.begin() as conn:
            conn.execute(text(SEED_SHAPED.format(id_type=ID_TYPES[dialect])))
    store.init_schema()
    return store


@pytest.fixture(params=[("postgresql", False), ("postgresql", True), ("sqlite", False), ("sqlite", True)],
                ids=["postgresql-created", "postgresql-seed-shaped", "sqlite-created", "sqlite-seed-shaped"])
def store(request):
    """A table made by `pool init-db` (TIMESTAMPTZ on PostgreSQL) or an old seed table it took over."""
    store = open_prepared(request, *request.param)
    yield store
    store.close()


@pytest.fixture(params=["postgresql", "sqlite"])
def seed_store(request):
    store = open_prepared(request, request.param, seed_shaped=True)
    yield store
    store.close()


def db_time(store, seconds_ago: float) -> str:
    """SQL for the database's own clock minus `seconds_ago`, never the test process's clock."""
    if store.dialect_name == "postgresql":
        return f"now() - make_interval(secs => {seconds_ago})"
    return f"strftime('%Y-%m-%d %H:%M:%f', 'now', '-{seconds_ago} seconds')"


def insert_row(store, seconds_ago: float | None, processed: int = 1, dead: bool = False) -> int:
    stamp = "NULL" if seconds_ago is None else db_time(store, seconds_ago)
    dead_at = db_time(store, seconds_ago or 0) if dead else "NULL"
    with store.engine.begin() as conn:
        return conn.execute(text(
            f"INSERT INTO signals (name, value, source, timestamp, processed, dead_at, attempts)"
            f" VALUES ('n', 1.0, 's', {stamp}, :p, {dead_at}, :a) RETURNING id"
        ), {"p": processed, "a": 5 if dead else 0}).scalar_one()


def remaining_ids(store) -> set[int]:
    with store.engine.connect() as conn:
        return {r[0] for r in conn.execute(text("SELECT id FROM signals"))}


def test_only_processed_rows_past_the_age_are_deleted(store):
    old = [insert_row(store, 3 * HOUR) for _ in range(4)]
    kept = {
        insert_row(store, 60),  # processed, but recent
        insert_row(store, 3 * HOUR, processed=0),  # old but not yet relayed
        insert_row(store, 3 * HOUR, processed=0, dead=True),  # `pool dead purge` owns these
    }
    assert store.count_prunable(HOUR) == 4
    assert store.prune_processed(HOUR, 100) == 4
    assert remaining_ids(store) == kept
    assert not set(old) & remaining_ids(store)
    assert store.prune_processed(HOUR, 100) == 0
    assert store.count_prunable(HOUR) == 0
    # A zero age takes every processed row, and still nothing else.
    assert store.prune_processed(0, 100) == 1
    assert remaining_ids(store) == kept - {min(kept)}


def test_rows_without_a_timestamp_are_kept(seed_store):
    unknown = {insert_row(seed_store, None), insert_row(seed_store, None, processed=0)}
    old = insert_row(seed_store, 3 * HOUR)
    assert seed_store.count_prunable(0) == 1
    assert Pruner(seed_store, 0, 1).run() == 1
    assert remaining_ids(seed_store) == unknown and old not in remaining_ids(seed_store)


def test_a_call_deletes_at_most_its_batch(store):
    for _ in range(8):
        insert_row(store, 2 * HOUR)
    assert store.prune_processed(HOUR, 3) == 3
    assert store.count_prunable(HOUR) == 5
    assert store.prune_processed(HOUR, 3) == 3
    assert store.prune_processed(HOUR, 3) == 2
    assert store.prune_processed(HOUR, 3) == 0


def test_the_age_is_measured_on_the_database_clock(store):
    # Ten minutes either side of the one-hour mark, as the database counts time.
    older = insert_row(store, HOUR + 600)
    younger = insert_row(store, HOUR - 600)
    assert store.count_prunable(HOUR) == 1
    assert store.prune_processed(HOUR, 10) == 1
    assert remaining_ids(store) == {younger}
    assert older not in remaining_ids(store)


def test_times_in_the_form_insert_signals_writes_are_aged_correctly(store):
    # insert_signals stores aware datetimes (on SQLite as ISO text with a 'T' and '+00:00').
    now = datetime.now(UTC)
    store.insert_signals([
        {"name": "old", "value": 1.0, "source": "s", "timestamp": now - timedelta(days=30)},
        {"name": "new", "value": 1.0, "source": "s", "timestamp": now + timedelta(days=1)},
    ])
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE signals SET processed = 1"))
    assert store.prune_processed(7 * 86400, 10) == 1
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT name FROM signals")).scalars().all() == ["new"]


def test_pruner_reports_each_batch_and_the_total(store):
    for _ in range(7):
        insert_row(store, 2 * HOUR)
    recent = insert_row(store, 10)
    batches: list[int] = []
    total = Pruner(store, HOUR, 3).run(progress=batches.append)
    assert batches == [3, 3, 1]
    assert total == sum(batches) == 7
    assert remaining_ids(store) == {recent}

    # A backlog that divides evenly ends on an empty batch, which is reported as well.
    for _ in range(6):
        insert_row(store, 2 * HOUR)
    batches.clear()
    assert Pruner(store, HOUR, 3).run(progress=batches.append) == 6
    assert batches == [3, 3, 0]


def test_pruner_stops_between_batches_when_asked(store):
    for _ in range(10):
        insert_row(store, 2 * HOUR)
    batches: list[int] = []
    total = Pruner(store, HOUR, 4).run(progress=batches.append, should_stop=lambda: len(batches) >= 1)
    assert total == 4 and batches == [4]
    assert store.count_prunable(HOUR) == 6


def test_bad_arguments_are_refused_before_any_sql(store):
    insert_row(store, 2 * HOUR)
    for age, batch in [(HOUR, 0), (HOUR, -1), (-1.0, 10), (float("nan"), 10), (float("inf"), 10)]:
        with pytest.raises(ValueError):
            store.prune_processed(age, batch)
    with pytest.raises(ValueError):
        Pruner(store, HOUR, 0)
    assert store.count_prunable(HOUR) == 1


def test_postgres_skips_rows_another_transaction_holds(request):
    store = open_prepared(request, "postgresql", seed_shaped=False)
    held, free = insert_row(store, 2 * HOUR), insert_row(store, 2 * HOUR)
    result: list[int] = []
    with store.engine.connect() as other:
        other.execute(text("SELECT id FROM signals WHERE id = :i FOR UPDATE"), {"i": held})
        # In a thread: were the prune to wait for the lock, the test would fail, not hang.
        worker = threading.Thread(target=lambda: result.append(store.prune_processed(HOUR, 10)))
        worker.start()
        worker.join(timeout=10)
        assert not worker.is_alive(), "prune waited on a locked row"
        other.rollback()
    assert result == [1]
    assert remaining_ids(store) == {held} and free not in remaining_ids(store)
    store.close()


def test_postgres_takes_naive_times_of_an_old_seed_table_as_utc(request):
    # A session nine hours ahead of UTC: naive times read in its zone would look 9 h older.
    store = open_prepared(request, "postgresql", seed_shaped=True,
                          url_suffix=quote(" -cTimeZone=Asia/Tokyo"))
    with store.engine.connect() as conn:
        assert conn.execute(text("SHOW TimeZone")).scalar_one() == "Asia/Tokyo"
    with store.engine.begin() as conn:
        rows = conn.execute(text(
            "INSERT INTO signals (name, value, source, timestamp, processed) VALUES"
            " ('recent', 1, 's', (now() AT TIME ZONE 'UTC') - interval '30 minutes', 1),"
            " ('old', 1, 's', (now() AT TIME ZONE 'UTC') - interval '2 hours', 1),"
            " ('unknown', 1, 's', NULL, 1)"
            " RETURNING name, id"
        )).all()
    ids = dict(rows)
    assert store.count_prunable(HOUR) == 1
    assert store.prune_processed(HOUR, 10) == 1
    assert remaining_ids(store) == {ids["recent"], ids["unknown"]}
    store.close()
