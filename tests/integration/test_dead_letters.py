"""Poison rows on real databases and a real Redis: isolated per row, retried, then dead."""

from __future__ import annotations

import json
import math

import pytest
from sqlalchemy import text

from pool.poller import Poller, PollerIdentity, StopSignal
from pool.publisher import Publisher
from pool.seeding import generate_signals
from pool.store import open_store
from pool.store.base import Lease
from tests.helpers import (
    SteppedClock,
    clean_env,
    make_settings,
    move_clock,
    redis_messages,
    run_pool,
    set_time,
    wait_until,
)


@pytest.fixture(params=["postgresql", "sqlite"])
def db_url(request) -> str:
    return request.getfixturevalue("pg_url" if request.param == "postgresql" else "sqlite_url")


def insert_poison(store) -> dict[str, int]:
    """One row of each bad kind; returns kind -> id."""
    kinds = {
        "nan": {"name": "n", "value": math.nan, "source": "s"},
        "inf": {"name": "n", "value": math.inf, "source": "s"},
        "null name": {"name": None, "value": 1.0, "source": "s"},
        "null value": {"name": "n", "value": None, "source": "s"},
        "too large": {"name": "x" * 5000, "value": 1.0, "source": "s"},
        "odd text": {"name": "ok \u2603 tab\tquote' \"back\\slash\u202e", "value": 2.0,
                     "source": "emoji \U0001F600 \r\n"},
    }
    ids = {}
    with store.engine.begin() as conn:
        for kind, row in kinds.items():
            ids[kind] = conn.execute(
                text("INSERT INTO signals (name, value, source, timestamp)"
                     " VALUES (:name, :value, :source, CURRENT_TIMESTAMP) RETURNING id"), row,
            ).scalar_one()
        if store.dialect_name == "sqlite":
            # Bytes that are not UTF-8, and a BLOB where a number belongs: only SQLite stores them.
            ids["bad utf-8"] = conn.execute(text(
                "INSERT INTO signals (name, value, source, timestamp)"
                " VALUES (CAST(X'C328' AS TEXT), 1.0, 's', CURRENT_TIMESTAMP) RETURNING id")).scalar_one()
            ids["blob value"] = conn.execute(text(
                "INSERT INTO signals (name, value, source, timestamp)"
                " VALUES ('n', X'0102', 's', CURRENT_TIMESTAMP) RETURNING id")).scalar_one()
    return ids


def test_poison_rows_never_hold_back_their_batch_and_die_at_once(db_url, redis_url, queue_name):
    settings = make_settings(db_url=db_url, broker_url=redis_url, queue=queue_name, batch_size="100",
                             max_attempts="3", retry_base_seconds="0.01", retry_cap_seconds="0.05",
                             max_payload_bytes="4096")
    store = open_store(settings)
    store.init_schema()
    store.insert_signals(list(generate_signals(40, seed=3)))
    poison = insert_poison(store)
    store.insert_signals(list(generate_signals(40, seed=4)))
    good_kinds = {"odd text"}
    publisher = Publisher(settings)
    poller = Poller(store, publisher, PollerIdentity("t", 0, 1), settings, StopSignal())
    try:
        # The first pass publishes every good row, poison rows in the middle notwithstanding.
        poller.run_once()
        counts = store.counts()
        assert counts.processed == 80 + len(good_kinds)
        # Their errors are their own values': permanent, so they are dead after that one pass.
        assert counts.unprocessed == 0
    finally:
        publisher.close()
    dead = {row.id: row for row in store.list_dead()}
    expected_dead = {row_id for kind, row_id in poison.items() if kind not in good_kinds}
    assert set(dead) == expected_dead
    assert all(row.attempts == 1 and row.last_error for row in dead.values())
    assert "not a finite number" in dead[poison["inf"]].last_error
    # SQLite stores NaN as NULL; PostgreSQL keeps it.
    nan_error = "value is NULL" if store.dialect_name == "sqlite" else "not a finite number"
    assert nan_error in dead[poison["nan"]].last_error
    assert "name is NULL" in dead[poison["null name"]].last_error
    assert "over the 4096-byte maximum" in dead[poison["too large"]].last_error
    with store.engine.connect() as conn:
        both = conn.execute(text("SELECT COUNT(*) FROM signals WHERE dead_at IS NOT NULL AND processed = 1"))
        assert both.scalar_one() == 0
    ids = {m["id"] for m in redis_messages(redis_url, queue_name)}
    assert f"signal-{poison['odd text']}" in ids
    assert not {f"signal-{i}" for i in expected_dead} & ids
    store.close()


def test_dead_letter_commands_list_requeue_and_purge(db_url, tmp_path):
    settings = make_settings(db_url=db_url)
    store = open_store(settings)
    store.init_schema()
    store.insert_signals(list(generate_signals(5, seed=5)))
    claim = store.claim("t", 1, 0, 5, 30)
    from pool.store.base import Failure

    store.nack(claim.lease, [Failure(id=i, error=f"boom {i}", retry_in=0, dead=True) for i in (1, 2, 3)])
    store.close()
    env = clean_env(PULSE_DB_URL=db_url)

    listed = run_pool("dead", "list", env=env, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["id", "attempts", "age", "last", "error"]
    assert [line.split()[0] for line in lines[1:]] == ["1", "2", "3"]
    assert "boom 2" in listed.stdout
    as_json = [json.loads(line) for line in run_pool("dead", "list", "--json", env=env).stdout.splitlines()]
    assert [row["id"] for row in as_json] == [1, 2, 3] and as_json[0]["attempts"] == 1

    assert run_pool("dead", "requeue", env=env).returncode == 2  # neither --id nor --all
    requeued = run_pool("dead", "requeue", "--id", "2", env=env)
    assert requeued.stdout.strip() == "requeued 1 dead row(s)"
    store = open_store(settings)
    assert [r.id for r in store.claim("again", 1, 0, 10, 30).rows] == [2]
    purge = ("dead", "purge", "--yes", "--older-than")
    assert run_pool(*purge, "1d", env=env).stdout.strip() == "purged 0 dead row(s)"
    assert run_pool(*purge, "0s", env=env).stdout.strip() == "purged 2 dead row(s)"
    refused = run_pool(*purge, "soon", env=env)
    assert refused.returncode == 2
    assert refused.stderr == "pool: error: --older-than: 'soon' is not an age like 30m, 12h or 7d\n"
    assert store.count_dead() == 0 and store.counts().processed + store.counts().unprocessed == 3
    assert run_pool("dead", "requeue", "--all", env=env).stdout.strip() == "requeued 0 dead row(s)"
    store.close()


def test_heartbeat_keeps_a_long_batch_leased_past_its_first_expiry(db_url):
    from pool.poller import LeaseHeartbeat

    store = open_store(make_settings(db_url=db_url))
    store.init_schema()
    store.insert_signals(list(generate_signals(3, seed=6)))
    lease = 30.0
    claim = store.claim("slow", 1, 0, 10, lease)
    clock = SteppedClock(0.0)
    heartbeat = LeaseHeartbeat(store, lease, clock=clock)
    extended = text(f"SELECT COUNT(*) FROM signals WHERE lease_until > {store._plus_seconds('s')}")
    with heartbeat.holding(claim.lease):
        # A third of the lease passes at a time, on the heartbeat's clock and on the database's
        # (the rows' expiry written a third closer rather than waited for): three thirds reach
        # the claim's own expiry. A short real lease would instead lapse whenever a loaded
        # machine held up the beat.
        for third in (1, 2, 3):
            set_time(store, "signals", "lease_until", lease * 2 / 3, "lease_owner = 'slow'")
            move_clock(heartbeat, clock, third * lease / 3)
            wait_until(lambda: rows_leased_beyond(store, extended, lease * 5 / 6) == 3, timeout=10,
                       interval=0.02, message=f"the beat after third {third} of the lease")
            assert store.claim("thief", 1, 0, 10, lease).rows == []
    heartbeat.close()
    assert store.ack(claim.lease, [1, 2, 3]) == 3
    store.close()


def test_a_stale_lease_cannot_release_nack_or_extend_rows_held_by_another(db_url):
    store = open_store(make_settings(db_url=db_url))
    store.init_schema()
    store.insert_signals(list(generate_signals(2, seed=8)))
    current = store.claim("new-owner", 1, 0, 10, 30)
    stale = Lease(owner="new-owner", token=current.lease.token ^ 1)
    from pool.store.base import Failure

    assert store.release(stale, [1, 2]) == 0
    assert store.nack(stale, [Failure(id=1, error="x", retry_in=0, dead=True)]) == 0
    assert store.extend_lease(stale, 30) == 0
    assert store.ack(current.lease, [1, 2]) == 2
    store.close()


def rows_leased_beyond(store, statement, seconds: float) -> int:
    # A connection per look: on SQLite an open transaction would hold the write lock the
    # heartbeat needs.
    with store.engine.connect() as conn:
        return conn.execute(statement, {"s": seconds}).scalar_one()
