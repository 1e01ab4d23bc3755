"""Claims, leases and acks on real PostgreSQL and SQLite."""

from __future__ import annotations

import multiprocessing
import threading
import traceback
from collections import Counter
from functools import partial

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from pool.seeding import generate_signals
from pool.store import open_store
from pool.store.base import Failure, Lease, first_line
from tests.helpers import make_settings, set_time


@pytest.fixture(params=["postgresql", "sqlite"])
def store(request):
    url = request.getfixturevalue("pg_url" if request.param == "postgresql" else "sqlite_url")
    store = open_store(make_settings(db_url=url), pool_size=4)
    store.init_schema()
    yield store
    store.close()


def seed(store, count: int) -> None:
    store.insert_signals(list(generate_signals(count, seed=7)))


def row_state(store, row_id: int) -> dict:
    with store.engine.connect() as conn:
        row = conn.execute(
            text("SELECT processed, lease_owner, lease_token, attempts, last_error, next_attempt_at"
                 " FROM signals WHERE id = :id"), {"id": row_id},
        ).mappings().one()
    return dict(row)


def test_claim_leases_a_batch_in_id_order_and_skips_leased_rows(store):
    seed(store, 25)
    first = store.claim("a", 1, 0, 10, 30)
    second = store.claim("b", 1, 0, 10, 30)
    third = store.claim("c", 1, 0, 10, 30)
    assert [r.id for r in first.rows] == list(range(1, 11))
    assert [r.id for r in second.rows] == list(range(11, 21))
    assert [r.id for r in third.rows] == list(range(21, 26))
    assert first.lease.token != second.lease.token
    state = row_state(store, 1)
    assert state["lease_owner"] == "a" and state["lease_token"] == first.lease.token
    row = first.rows[0]
    assert row.name and row.source and row.timestamp is not None and row.attempts == 0


def test_shards_split_rows_by_id_modulo(store):
    seed(store, 40)
    for shard in range(4):
        claim = store.claim(f"p{shard}", 4, shard, 100, 30)
        assert claim.rows, shard
        assert all(r.id % 4 == shard for r in claim.rows)
        assert len(claim.rows) == 10


def test_concurrent_claims_never_hand_out_a_row_twice(store):
    # Threads of one store: on PostgreSQL the store's lock runs their claims one at a time, so
    # only the separate-process test below has the database see concurrent claims.
    seed(store, 600)
    taken: list[list[int]] = []
    lock = threading.Lock()

    def claimer(name: str) -> None:
        while True:
            claim = store.claim(name, 1, 0, 25, 30)
            if not claim.rows:
                return
            with lock:
                taken.append([r.id for r in claim.rows])

    threads = [threading.Thread(target=claimer, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    ids = [i for batch in taken for i in batch]
    assert sorted(ids) == list(range(1, 601))


def claim_and_ack_until_empty(db_url: str, name: str, start, results) -> None:
    """One poller process's share of the work: claim and ack batches until none is left.

    Its own store, engine and connection, as in `pool start`; the barrier makes the four
    processes claim at the same moment rather than one after the other as they boot. A database
    error is retried, as the poller does, and reported: the test fails on any, but only after
    counting hand-outs, which say what went wrong."""
    errors: list[str] = []
    taken: list[int] = []

    def retried(action):
        while True:
            try:
                return action()
            except DBAPIError as exc:
                errors.append(first_line(exc))
                if len(errors) >= 500:  # not a passing conflict: give up
                    raise

    try:
        store = open_store(make_settings(db_url=db_url))
        # Open the store's kept connection before the barrier, so the first claims overlap.
        store.extend_lease(Lease(owner=name, token=0), 1)
        start.wait(timeout=60)
        while (claim := retried(partial(store.claim, name, 1, 0, 25, 30))).rows:
            ids = [r.id for r in claim.rows]
            taken += ids
            retried(partial(store.ack, claim.lease, ids))
        store.close()
        results.put((taken, errors, None))
    except BaseException:  # noqa: BLE001 - reported to the test, which fails with it
        results.put((taken, errors, traceback.format_exc()))


@pytest.mark.parametrize("database", ["postgresql", "sqlite"])
def test_pollers_in_separate_processes_never_hand_out_a_row_twice(request, database: str):
    # The real layout: each poller is a process with its own store, so the database alone (FOR
    # UPDATE SKIP LOCKED; SQLite's BEGIN IMMEDIATE) keeps two concurrent claims from leasing the
    # same row. The threaded test above shares one store, whose lock lets one claim run at a time.
    db_url = request.getfixturevalue("pg_url" if database == "postgresql" else "sqlite_url")
    rows, processes = 4000, 4
    store = open_store(make_settings(db_url=db_url))
    store.init_schema()
    seed(store, rows)
    store.close()  # no pooled connection may cross into the forked children
    # Forked, not spawned: each child still opens its own store, and starts in milliseconds
    # rather than importing SQLAlchemy anew (seconds on a loaded machine).
    context = multiprocessing.get_context("fork")
    start, results = context.Barrier(processes), context.Queue()
    workers = [context.Process(target=claim_and_ack_until_empty, args=(db_url, f"p{i}", start, results))
               for i in range(processes)]
    for worker in workers:
        worker.start()
    try:
        reports = [results.get(timeout=120) for _ in workers]
    finally:
        for worker in workers:
            worker.join(timeout=30)
            if worker.is_alive():
                worker.kill()
    handed_out = Counter(i for taken, _, _ in reports for i in taken)
    twice = sorted(i for i, n in handed_out.items() if n > 1)
    assert not twice, f"{handed_out.total()} hand-outs of {rows} rows; {len(twice)} rows more than once"
    crashes = [crash for _, _, crash in reports if crash]
    assert not crashes, crashes[0]
    assert sorted(handed_out) == list(range(1, rows + 1))
    errors = [error for _, errors, _ in reports for error in errors]
    assert not errors, f"{len(errors)} database errors, e.g. {errors[0]}"
    assert store.counts().processed == rows
    store.close()


def test_a_claim_passes_over_rows_another_transaction_holds_locked(pg_url):
    # Another poller's claim in flight, or a prune's delete, holds rows locked for a moment. A
    # claim must take the next rows, not queue behind that lock: waiting (FOR UPDATE without
    # SKIP LOCKED) serialises the pollers and lets two claims deadlock.
    store = open_store(make_settings(db_url=pg_url))
    store.init_schema()
    seed(store, 20)
    claimed: list[list[int]] = []

    def claim() -> None:
        claimed.append([r.id for r in store.claim("a", 1, 0, 10, 30).rows])

    claimer = threading.Thread(target=claim)
    with psycopg.connect(pg_url) as holder:
        holder.execute("SELECT id FROM signals WHERE id <= 10 FOR UPDATE")
        claimer.start()
        claimer.join(timeout=10)  # ends in milliseconds unless the claim waits for the lock
        waited = claimer.is_alive()
        holder.rollback()
    claimer.join(timeout=30)
    store.close()
    assert not waited, "the claim waited for rows another transaction held locked"
    assert claimed == [list(range(11, 21))]


def test_ack_marks_processed_only_under_the_current_lease(store):
    seed(store, 5)
    claim = store.claim("a", 1, 0, 5, 30)
    stale = type(claim.lease)(owner="a", token=claim.lease.token + 1)
    assert store.ack(stale, [1, 2]) == 0
    assert store.ack(claim.lease, [1, 2]) == 2
    assert row_state(store, 1)["processed"] == 1
    assert row_state(store, 1)["lease_owner"] is None
    assert row_state(store, 3)["processed"] == 0
    assert store.counts().processed == 2 and store.counts().unprocessed == 3


def test_expired_lease_is_reclaimed_and_the_old_holder_can_no_longer_ack(store):
    seed(store, 3)
    old = store.claim("dead-poller", 1, 0, 10, 30)
    assert len(old.rows) == 3
    set_time(store, "signals", "lease_until", 1, "id IN (1, 2, 3)")  # a second left, by the database
    assert store.claim("other", 1, 0, 10, 30).rows == []
    set_time(store, "signals", "lease_until", -1, "id IN (1, 2, 3)")  # ran out a second ago
    new = store.claim("other", 1, 0, 10, 30)
    assert [r.id for r in new.rows] == [1, 2, 3]
    assert (old.reclaimed, new.reclaimed) == (0, 3)  # taken over from the expired lease
    assert store.ack(old.lease, [1, 2, 3]) == 0
    assert store.ack(new.lease, [1, 2, 3]) == 3


def test_release_makes_rows_claimable_at_once(store):
    seed(store, 4)
    claim = store.claim("a", 1, 0, 4, 300)
    assert store.release(claim.lease, [3, 4]) == 2
    again = store.claim("b", 1, 0, 10, 30)
    assert [r.id for r in again.rows] == [3, 4]
    assert again.reclaimed == 0  # released rows are free, not taken over


def test_nack_records_the_error_and_delays_the_row(store):
    seed(store, 2)
    claim = store.claim("a", 1, 0, 2, 30)
    assert store.nack(claim.lease, [Failure(id=1, error="payload is bad", retry_in=3600, dead=False)]) == 1
    state = row_state(store, 1)
    assert state["attempts"] == 1 and state["last_error"] == "payload is bad"
    assert state["next_attempt_at"] is not None and state["lease_owner"] is None
    store.release(claim.lease, [2])
    assert [r.id for r in store.claim("b", 1, 0, 10, 30).rows] == [2]


def test_a_kept_connection_killed_while_idle_is_replaced_without_an_error(pg_url):
    # What a database restart does to an idle poller: its server session is gone. The name
    # singles out this store's session among any others on the server.
    store = open_store(make_settings(db_url=f"{pg_url}&application_name=pool-kept-test"))
    store.init_schema()
    seed(store, 4)
    first = store.claim("a", 1, 0, 2, 30)
    with store.engine.connect() as conn:
        killed = conn.execute(text(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = 'pool-kept-test' AND pid <> pg_backend_pid()"
        )).scalars().all()
    assert killed == [True]
    assert store.ack(first.lease, [r.id for r in first.rows]) == 2
    assert [r.id for r in store.claim("a", 1, 0, 2, 30).rows] == [3, 4]
    store.close()


def test_backlog_stats_count_per_shard_the_oldest_age_and_dead_rows(store):
    seed(store, 10)
    assert store.backlog_stats(3).by_shard == {0: 3, 1: 4, 2: 3}
    claim = store.claim("a", 1, 0, 4, 30)
    store.ack(claim.lease, [1, 2])
    store.nack(claim.lease, [Failure(id=3, error="bad", retry_in=0, dead=True)])
    stats = store.backlog_stats(3)
    # Row 4 is leased but not processed: still backlog. Rows 1-2 are done, row 3 is dead.
    assert (stats.backlog, stats.dead) == (7, 1)
    assert stats.by_shard == {0: 2, 1: 3, 2: 2}
    assert stats.oldest_age_seconds is not None and stats.oldest_age_seconds >= 0
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE signals SET processed = 1 WHERE dead_at IS NULL"))
    assert store.backlog_stats(3) == type(stats)(backlog=0, oldest_age_seconds=None, dead=1,
                                                  by_shard={0: 0, 1: 0, 2: 0})
