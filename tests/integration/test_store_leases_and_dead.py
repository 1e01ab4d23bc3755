"""Lease extension, dead letters and the small answers of the store, on real PostgreSQL and
SQLite: what the heartbeat, `pool dead-letters` and `pool status` rely on."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import make_url, text
from sqlalchemy.exc import DBAPIError

from pool.errors import ConfigError
from pool.seeding import generate_signals
from pool.store import Unreadable, open_store
from pool.store.base import Failure, Lease, first_line
from tests.helpers import make_settings, set_time


@pytest.fixture(params=["postgresql", "sqlite"])
def store(request):
    url = request.getfixturevalue("pg_url" if request.param == "postgresql" else "sqlite_url")
    store = open_store(make_settings(db_url=url))
    store.init_schema()
    yield store
    store.close()


def seed(store, count: int) -> None:
    store.insert_signals(list(generate_signals(count, seed=7)))


def scalar(store, sql: str, **params):
    with store.engine.connect() as conn:
        return conn.execute(text(sql), params).scalar_one()


def leased_beyond(store, seconds: float) -> list[int]:
    """Ids whose lease runs at least `seconds` more by the database's clock."""
    with store.engine.connect() as conn:
        return list(conn.execute(text(
            f"SELECT id FROM signals WHERE lease_until >= {store._plus_seconds('s')} ORDER BY id"
        ), {"s": seconds}).scalars())


def dead_rows(store, ids: list[int], error: str = "broker refused it", retry_in: float = 3600) -> Lease:
    claim = store.claim("a", 1, 0, len(ids), 30)
    assert sorted(r.id for r in claim.rows) == ids
    failures = [Failure(id=i, error=error, retry_in=retry_in, dead=True) for i in ids]
    assert store.nack(claim.lease, failures) == len(ids)
    return claim.lease


def test_extend_lease_keeps_the_current_leases_unprocessed_rows_only(store):
    seed(store, 4)
    claim = store.claim("a", 1, 0, 3, 30)
    store.ack(claim.lease, [1])
    # Rows 2 and 3 a second from expiry; row 4 is someone else's, processed row 1 has no lease.
    set_time(store, "signals", "lease_until", 1, "id IN (2, 3)")
    other = store.claim("b", 1, 0, 1, 30)
    stale = Lease(owner="a", token=claim.lease.token + 1)
    assert store.extend_lease(stale, 600) == 0
    assert store.extend_lease(Lease(owner="c", token=claim.lease.token), 600) == 0
    assert leased_beyond(store, 500) == []
    assert store.extend_lease(claim.lease, 600) == 2
    assert leased_beyond(store, 500) == [2, 3]
    assert store.ack(other.lease, [4]) == 1
    assert store.ack(claim.lease, [2, 3]) == 2


def test_extend_lease_leaves_a_processed_row_alone(store):
    seed(store, 2)
    claim = store.claim("a", 1, 0, 2, 30)
    with store.engine.begin() as conn:  # processed by hand while the lease is still on it
        conn.execute(text("UPDATE signals SET processed = 1 WHERE id = 1"))
    assert store.extend_lease(claim.lease, 600) == 1
    assert leased_beyond(store, 500) == [2]


def test_nack_counts_the_attempt_keeps_the_error_and_delays_by_the_given_time(store):
    seed(store, 3)
    claim = store.claim("a", 1, 0, 3, 30)
    assert store.nack(claim.lease, []) == 0
    assert store.nack(claim.lease, [
        Failure(id=1, error="x" * 5000, retry_in=600, dead=False),
        Failure(id=2, error="retry me now", retry_in=0, dead=False),
    ]) == 2
    assert scalar(store, "SELECT last_error FROM signals WHERE id = 1") == "x" * 2000
    with store.engine.connect() as conn:
        later = conn.execute(text(
            f"SELECT id FROM signals WHERE next_attempt_at >= {store._plus_seconds('s')}"
        ), {"s": 500}).scalars().all()
    assert later == [1]
    again = store.claim("b", 1, 0, 10, 30)
    assert [(r.id, r.attempts) for r in again.rows] == [(2, 1)]
    set_time(store, "signals", "next_attempt_at", -1, "id = 1")
    assert [(r.id, r.attempts) for r in store.claim("b", 1, 0, 10, 30).rows] == [(1, 1)]
    assert store.count_dead() == 0


def test_ack_release_and_requeue_of_no_rows_change_nothing(store):
    seed(store, 2)
    claim = store.claim("a", 1, 0, 2, 30)
    assert store.ack(claim.lease, []) == 0
    assert store.release(claim.lease, []) == 0
    assert store.requeue_dead([]) == 0
    assert store.counts().processed == 0


def test_dead_rows_are_listed_with_their_error_attempts_and_age(store):
    seed(store, 4)
    dead_rows(store, [1, 2, 3])
    set_time(store, "signals", "dead_at", -120, "id = 2")
    set_time(store, "signals", "dead_at", -60, "id = 3")
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE signals SET attempts = 5, last_error = 'gone' WHERE id = 3"))
    assert store.count_dead() == 3 and store.counts().dead == 3
    listed = store.list_dead()
    assert [(d.id, d.attempts, d.last_error) for d in listed] == [
        (2, 1, "broker refused it"), (3, 5, "gone"), (1, 1, "broker refused it")]
    ages = [d.age_seconds for d in listed]
    assert 119 <= ages[0] < 150 and 59 <= ages[1] < 90 and 0 <= ages[2] < 30
    assert [d.id for d in store.list_dead(limit=2)] == [2, 3]


def test_list_dead_shows_a_hundred_rows_unless_asked_for_more(store):
    seed(store, 101)
    dead_rows(store, list(range(1, 102)), retry_in=0)
    assert len(store.list_dead()) == 100
    assert len(store.list_dead(limit=101)) == 101


def test_requeue_dead_revives_the_rows_named_or_all_of_them(store):
    seed(store, 4)
    dead_rows(store, [1, 2, 3])
    store.claim("a", 1, 0, 1, 30)  # row 4: leased, not dead
    assert store.requeue_dead([2, 4]) == 1
    assert store.count_dead() == 2
    assert [d.id for d in store.list_dead()] == [1, 3]
    # Claimable at once, with a fresh count of attempts: the 1-hour retry delay is gone.
    assert [(r.id, r.attempts) for r in store.claim("b", 1, 0, 10, 30).rows] == [(2, 0)]
    assert store.requeue_dead(None) == 2
    assert store.count_dead() == 0 and store.list_dead() == []
    assert [(r.id, r.attempts) for r in store.claim("c", 1, 0, 10, 30).rows] == [(1, 0), (3, 0)]
    assert store.requeue_dead(None) == 0


def test_db_now_is_the_databases_clock(store):
    now = store.db_now()
    if isinstance(now, str):  # SQLite: UTC text
        now = datetime.fromisoformat(now).replace(tzinfo=UTC)
    assert abs((now - datetime.now(UTC)).total_seconds()) < 5


def test_a_dead_row_with_a_hand_written_infinite_time_lists_with_age_zero(pg_url):
    store = open_store(make_settings(db_url=pg_url))
    store.init_schema()
    seed(store, 1)
    dead_rows(store, [1])
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE signals SET dead_at = 'infinity' WHERE id = 1"))
    assert [(d.id, d.age_seconds) for d in store.list_dead()] == [(1, 0.0)]
    store.close()


def test_a_claim_of_unreadable_values_counts_no_takeover(pg_url):
    store = open_store(make_settings(db_url=pg_url))
    store.init_schema()
    with store.engine.begin() as conn:
        conn.execute(text("INSERT INTO signals (id, name, value, source, timestamp)"
                          " VALUES (1, 'a', 1, 's', 'infinity')"))
    claim = store.claim("me", 1, 0, 10, 30)
    assert isinstance(claim.rows[0].timestamp, Unreadable)
    assert claim.reclaimed == 0
    store.close()


def test_first_line_gives_the_drivers_first_line_without_sql(store):
    with pytest.raises(DBAPIError) as caught, store.engine.connect() as conn:
        conn.execute(text("SELECT no_such_column FROM signals WHERE id = :id"), {"id": 1})
    line = first_line(caught.value)
    assert line == str(caught.value.orig).strip().splitlines()[0]
    assert "no_such_column" in line and "[SQL" not in line and not line.startswith("(")
    assert first_line(RuntimeError("")) == "RuntimeError"
    assert first_line(RuntimeError("  \n")) == "RuntimeError"


def test_an_unreadable_value_is_described_by_its_first_40_characters():
    value = Unreadable("9" * 50, "year out of range")
    assert str(value) == f"{'9' * 40!r} cannot be read (year out of range)"


def test_retention_refuses_bad_arguments_saying_which(store):
    with pytest.raises(ValueError, match="older_than_seconds must be a finite number >= 0, got -1"):
        store.prune_processed(-1, 10)
    with pytest.raises(ValueError, match="older_than_seconds must be a finite number >= 0, got inf"):
        store.count_prunable(float("inf"))
    with pytest.raises(ValueError, match="batch_rows must be at least 1, got 0"):
        store.prune_processed(60, 0)


def test_an_insert_wakes_the_listeners_of_its_own_table_only(pg_url):
    # Idle pollers otherwise find new rows only at their next poll, which busy polling hides in
    # a poller test: the listener is asked directly.
    stores = [open_store(make_settings(db_url=pg_url, table=t)) for t in ("signals", "other_signals")]
    listeners = []
    try:
        for store in stores:
            store.init_schema(notify=True)
            listeners.append(store.wake_listener())
            listeners[-1].listen()
        stores[1].insert_signals(list(generate_signals(1, seed=7)))
        assert listeners[1].wait(10, lambda: False) is True
        assert listeners[0].wait(0.5, lambda: False) is False
        stores[0].insert_signals(list(generate_signals(1, seed=7)))
        assert listeners[0].wait(10, lambda: False) is True
    finally:
        for listener in listeners:
            listener.close()
        for store in stores:
            store.close()


def test_a_fresh_postgres_store_reads_backlog_age_without_a_schema_check_first(pg_url):
    # `pool status` and retention open a store and ask at once: the timestamp column's type is
    # looked up on first use, not only by check_schema.
    maker = open_store(make_settings(db_url=pg_url))
    maker.init_schema()
    seed(maker, 1)
    set_time(maker, "signals", "timestamp", -60, "id = 1")
    maker.close()
    store = open_store(make_settings(db_url=pg_url))
    try:
        age = store.backlog_stats(1).oldest_age_seconds
        assert age is not None and 59 <= age < 90
        assert store.count_prunable(30) == 0
    finally:
        store.close()


def test_retention_on_a_table_without_the_timestamp_column_names_it(pg_url):
    open_store(make_settings(db_url=pg_url)).init_schema()
    store = open_store(make_settings(db_url=pg_url, column_timestamp="created"))
    try:
        with pytest.raises(ConfigError, match="table 'signals' has no column 'created'"):
            store.count_prunable(60)
    finally:
        store.close()


def test_a_row_stamped_in_the_future_is_waiting_for_zero_seconds(store):
    # A producer whose clock runs ahead: its rows are not "waiting for -60 s" (nor for 1 s).
    seed(store, 1)
    set_time(store, "signals", "timestamp", 60, "id = 1")
    assert store.backlog_stats(1).oldest_age_seconds == 0.0


def test_a_claim_of_several_shards_or_none(store):
    seed(store, 12)
    claim = store.claim("a", 4, [0, 2], 100, 30)
    assert [r.id for r in claim.rows] == [2, 4, 6, 8, 10, 12]
    # A poller that holds no shard at the moment claims nothing and takes no row.
    empty = store.claim("b", 4, [], 100, 30)
    assert (empty.lease.owner, empty.rows, empty.reclaimed) == ("b", [], 0)
    assert store.counts().unprocessed == 12


def test_check_schema_says_the_database_cannot_be_reached_without_its_password(pg_url):
    url = make_url(pg_url).set(database="pool_no_such_db", password="s3cret-pw")
    store = open_store(make_settings(db_url=url.render_as_string(hide_password=False)))
    try:
        with pytest.raises(ConfigError) as caught:
            store.check_schema()
    finally:
        store.close()
    message = str(caught.value)
    shown = url.render_as_string(hide_password=True)
    assert message.startswith(f"cannot reach database {shown}: ")
    driver_line = message.removeprefix(f"cannot reach database {shown}")
    assert 'database "pool_no_such_db" does not exist' in driver_line
    assert "s3cret-pw" not in message and "[SQL" not in message


def test_check_schema_names_the_missing_table_columns_and_shard_tables(pg_url):
    store = open_store(make_settings(db_url=pg_url))
    try:
        with pytest.raises(ConfigError, match=r"table 'signals' not found in .*; run `pool init-db` first$"):
            store.check_schema()
        with store.engine.begin() as conn:
            conn.execute(text("CREATE TABLE signals (id BIGINT PRIMARY KEY, name TEXT, value FLOAT,"
                              " source TEXT, timestamp TIMESTAMPTZ, processed INT, attempts INT)"))
        with pytest.raises(ConfigError) as caught:
            store.check_schema()
        assert str(caught.value) == (
            "table 'signals' lacks column(s) lease_owner, lease_until, lease_token, next_attempt_at,"
            " last_error, dead_at; run `pool init-db` to add the relay's columns")
        store.init_schema()
        meta, shards, _members = store.shard_table_names()
        with store.engine.begin() as conn:
            conn.execute(text(f"DROP TABLE {meta}"))
            conn.execute(text(f"DROP TABLE {shards}"))
        with pytest.raises(ConfigError) as caught:
            store.check_schema()
        assert str(caught.value) == (
            f"table(s) {meta}, {shards} for shard leases not found; run `pool init-db` to create them")
    finally:
        store.close()


def test_a_connection_lost_again_on_the_retry_is_a_database_error_and_the_store_recovers(pg_url):
    # What a database that restarts twice in a row does: the statement is tried twice, then its
    # error goes to the poller, which backs off from database errors (any other error ends it).
    store = open_store(make_settings(db_url=pg_url))
    store.init_schema()
    seed(store, 2)
    tries = []

    def dies(conn):
        tries.append(1)
        return conn.execute(text("SELECT pg_terminate_backend(pg_backend_pid())")).all()

    try:
        with pytest.raises(DBAPIError) as caught:
            store._one_statement(dies)
        assert caught.value.connection_invalidated and len(tries) == 2
        assert [r.id for r in store.claim("a", 1, 0, 10, 30).rows] == [1, 2]
    finally:
        store.close()


def test_init_db_of_a_new_table_reports_it_created_not_columns_added(store):
    with store.engine.begin() as conn:
        conn.execute(text("DROP TABLE signals"))
    changes = store.init_schema()
    assert changes.created_table and changes.added_columns == ()


def test_sqlite_tables_that_differ_in_case_only_share_their_shard_tables(sqlite_url):
    # SQLite: `Signals_...` and `signals_...` are one table, even past the length where
    # derived names take a hash of the table's name.
    table = "Signals_" + "x" * 50
    stores = [open_store(make_settings(db_url=sqlite_url, table=t)) for t in (table, table.lower())]
    try:
        metas = [s.shard_table_names()[0] for s in stores]
        assert metas[0].lower() == metas[1].lower() and len(metas[0]) <= 63
    finally:
        for s in stores:
            s.close()
