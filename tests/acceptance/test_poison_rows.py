"""Rows that cannot be relayed as they are, relayed by `pool start` as a user runs it: each dies
alone and at once, with its own error; its batch-mates and rows with any id are relayed.

The lease is long, so a good row that waited for a bad batch-mate's lease to run out (as a
batch whose read failed did) would blow the time bound."""

from __future__ import annotations

import sqlite3
import time

import psycopg
import pytest

from pool.store import open_store
from tests.helpers import PoolProcess, clean_env, make_settings, redis_messages, run_pool, wait_until

LEASE, BOUND = 60, 30


def rows_of(db_url: str) -> dict[int, tuple]:
    """id -> (processed, dead, attempts, last_error)."""
    sql = "SELECT id, processed, dead_at IS NOT NULL, attempts, last_error FROM signals"
    if db_url.startswith("sqlite"):
        with sqlite3.connect(db_url.removeprefix("sqlite:///")) as conn:
            found = conn.execute(sql).fetchall()
    else:
        with psycopg.connect(db_url) as conn:
            found = conn.execute(sql).fetchall()
    return {r[0]: (r[1], bool(r[2]), r[3], r[4]) for r in found}


def execute(db_url: str, sql: str) -> None:
    if db_url.startswith("sqlite"):
        with sqlite3.connect(db_url.removeprefix("sqlite:///")) as conn:
            conn.execute(sql)
    else:
        with psycopg.connect(db_url) as conn:
            conn.execute(sql)


def prepare_table(db_url: str, insert: str) -> None:
    store = open_store(make_settings(db_url=db_url))
    try:
        store.init_schema()
    finally:
        store.close()
    execute(db_url, insert)


def good_rows(first_id: int, count: int) -> str:
    return ", ".join(f"({i}, 'n', 1.5, 's')" for i in range(first_id, first_id + count))


def relay_until_drained(db_url: str, redis_url: str, queue_name: str, tmp_path, **settings: str) -> dict:
    """`pool start` until no row is pending (within BOUND seconds of the start); returns rows_of."""
    env = clean_env(PULSE_DB_URL=db_url, PULSE_BROKER_URL=redis_url, PULSE_QUEUE=queue_name,
                    PULSE_BATCH_SIZE="10", PULSE_LEASE_SECONDS=str(LEASE), PULSE_METRICS_PORT="0",
                    PULSE_DB_POLL_INTERVAL="0.2", **settings)
    started = time.monotonic()
    pool = PoolProcess("start", "--workers", "2", env=env, cwd=tmp_path)
    try:
        pool.wait_for_line(r"ready: 2 pollers")
        wait_until(lambda: all(p or d for p, d, _a, _e in rows_of(db_url).values()),
                   timeout=BOUND - (time.monotonic() - started), message="no pending rows left")
        status = run_pool("status", "--json", env=env, cwd=tmp_path)
        assert '"unprocessed": 0' in status.stdout, status.stdout + status.stderr
    finally:
        pool.kill()
    assert "Traceback" not in pool.output()
    return rows_of(db_url)


def test_an_unreadable_timestamp_dies_alone_and_its_batch_mates_are_relayed(pg_url, redis_url, queue_name,
                                                                             tmp_path):
    prepare_table(pg_url, "INSERT INTO signals (id, name, value, source, timestamp) VALUES"
                          " (1, 'x', 1, 's', 'infinity'), (2, 'x', 1, 's', '-infinity'),"
                          " (3, 'x', 1, 's', '10000-01-01')")
    execute(pg_url, f"INSERT INTO signals (id, name, value, source) VALUES {good_rows(4, 27)}")
    rows = relay_until_drained(pg_url, redis_url, queue_name, tmp_path)
    for row_id in (1, 2, 3):
        processed, dead, attempts, error = rows[row_id]
        assert (processed, dead, attempts) == (0, True, 1), rows[row_id]
        assert error.startswith("timestamp '") and "cannot be read (timestamp too " in error, error
    assert {i: rows[i][:3] for i in range(4, 31)} == {i: (1, False, 0) for i in range(4, 31)}
    assert sorted(m["id"] for m in redis_messages(redis_url, queue_name)) == sorted(
        f"signal-{i}" for i in range(4, 31))


@pytest.mark.parametrize("database", ["postgresql", "sqlite"])
def test_negative_zero_and_extreme_ids_are_relayed(database, request, redis_url, queue_name, tmp_path):
    db_url = request.getfixturevalue("pg_url" if database == "postgresql" else "sqlite_url")
    ids = [-(2**63), -(2**63) + 1, -65, -64, -1, 0, 1, 2**63 - 1]
    prepare_table(db_url, "INSERT INTO signals (id, name, value, source) VALUES "
                          + ", ".join(f"({i}, 'n', 1.5, 's')" for i in ids))
    rows = relay_until_drained(db_url, redis_url, queue_name, tmp_path)
    assert {i: rows[i][:3] for i in ids} == {i: (1, False, 0) for i in ids}
    messages = redis_messages(redis_url, queue_name)
    assert sorted(m["args"][0]["id"] for m in messages) == sorted(ids)


def test_a_row_with_a_permanent_error_is_dead_on_its_first_attempt(pg_url, redis_url, queue_name, tmp_path):
    # Five attempts allowed, and a backoff that would spread them over minutes: a permanent
    # error must not use them.
    bad = {1: "name is NULL", 2: "value is NULL", 3: "value is not a finite number (nan)",
           4: "value is not a finite number (inf)", 5: "payload is "}
    prepare_table(pg_url, "INSERT INTO signals (id, name, value, source) VALUES"
                          " (1, NULL, 1, 's'), (2, 'n', NULL, 's'), (3, 'n', 'NaN', 's'),"
                          " (4, 'n', 'Infinity', 's'), (5, repeat('x', 70000), 1, 's')")
    execute(pg_url, f"INSERT INTO signals (id, name, value, source) VALUES {good_rows(6, 15)}")
    rows = relay_until_drained(pg_url, redis_url, queue_name, tmp_path, PULSE_MAX_ATTEMPTS="5",
                               PULSE_RETRY_BASE_SECONDS="60", PULSE_RETRY_CAP_SECONDS="600")
    for row_id, error in bad.items():
        processed, dead, attempts, last_error = rows[row_id]
        assert (processed, dead, attempts) == (0, True, 1), rows[row_id]
        assert last_error.startswith(error), last_error
    assert {i: rows[i][:3] for i in range(6, 21)} == {i: (1, False, 0) for i in range(6, 21)}
