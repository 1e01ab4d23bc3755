"""The shard lease and membership SQL on PostgreSQL and SQLite (the database's clock decides)."""

from __future__ import annotations

import os

import pytest
from sqlalchemy import text

from pool.errors import ConfigError
from pool.seeding import generate_signals
from pool.shards import ShardKeeper, desired_shards
from pool.store import open_store
from pool.store.base import Failure
from tests.helpers import make_settings, set_time


@pytest.fixture(params=["postgresql", "sqlite"])
def db_url(request):
    return request.getfixturevalue("pg_url" if request.param == "postgresql" else "sqlite_url")


@pytest.fixture
def store(db_url):
    store = open_store(make_settings(db_url=db_url, shards="8"))
    store.init_schema()
    yield store
    store.close()


MEMBERS, SHARDS = "signals_pool_members", "signals_pool_shards"


def silent_for(store, member: str, seconds: float) -> None:
    set_time(store, MEMBERS, "heartbeat_at", -seconds, "member = :m", m=member)


def test_init_db_says_how_many_shards_it_split_the_table_into_once(db_url):
    store = open_store(make_settings(db_url=db_url, shards="8"))
    try:
        assert "shard count 8 (rows belong to shard id % 8)" in store.init_schema().created_extras
        assert not any("shard count" in line for line in store.init_schema().created_extras)
    finally:
        store.close()


def test_init_db_records_the_shard_count_and_refuses_to_change_it(store, db_url):
    assert store.shard_count() == 8
    other = open_store(make_settings(db_url=db_url, shards="16"))
    try:
        with pytest.raises(ConfigError, match="split into 8 shards for good"):
            other.init_schema()
    finally:
        other.close()


def test_membership_lists_live_members_sorted(store):
    assert store.member_heartbeat("b/poller-0", "b", 11, 30) == ["b/poller-0"]
    assert store.member_heartbeat("a/poller-0", "a", 12, 30) == ["a/poller-0", "b/poller-0"]
    members, _owners = store.cluster(30)
    assert [(m.member, m.host, m.pid, m.live) for m in members] == [
        ("a/poller-0", "a", 12, True), ("b/poller-0", "b", 11, True)]


def test_a_restarted_process_forgets_its_silent_predecessor_after_one_ttl(store):
    # A host killed and started again: its new poller-0 must not leave the old one as a ghost
    # for 3 ttl (or for good, once every poller has stopped and nobody forgets it).
    ttl = 30.0
    for member, pid in (("h/poller-0/old", 1), ("h/poller-0/twin", 2), ("h/poller-1/other", 3)):
        store.member_heartbeat(member, "h", pid, ttl)
    silent_for(store, "h/poller-0/old", ttl + 1)
    silent_for(store, "h/poller-0/twin", ttl - 1)  # a duplicate host id that still beats: it stays
    silent_for(store, "h/poller-1/other", ttl + 1)  # another slot is forgotten only after 3 ttl
    assert store.member_heartbeat("h/poller-0/new", "h", 4, ttl) == ["h/poller-0/new", "h/poller-0/twin"]
    names = [m.member for m in store.cluster(ttl)[0]]
    assert names == ["h/poller-0/new", "h/poller-0/twin", "h/poller-1/other"]


def test_a_member_silent_for_just_over_a_ttl_is_no_longer_live_and_after_3_ttl_it_is_forgotten(store):
    ttl = 30.0
    over, under, kept, gone, me = (f"{host}/poller-0/{n}" for n, host in enumerate("abcde"))
    for member in (over, under, kept, gone, me):
        store.member_heartbeat(member, member[0], 1, ttl)
    for member, silent in ((over, ttl + 1), (under, ttl - 1), (kept, 3 * ttl - 1), (gone, 3 * ttl + 1)):
        silent_for(store, member, silent)
    # Only live members share the shards: one counted live too long keeps shards nobody works on.
    assert store.member_heartbeat(me, "e", 5, ttl) == [under, me]
    assert {m.member: m.live for m in store.cluster(ttl)[0]} == {over: False, under: True, kept: False,
                                                                 me: True}
    # Status shows how long ago each member beat, as the database's clock says.
    ages = {m.member: m.heartbeat_age_seconds for m in store.cluster(ttl)[0]}
    assert ttl - 1 <= ages[under] < ttl + 10 and 3 * ttl - 1 <= ages[kept] < 3 * ttl + 10
    assert 0 <= ages[me] < 1


def test_a_silent_members_shards_are_free_once_their_leases_run_out_and_not_before(store):
    assert store.sync_shards("a", range(4), 30) == [0, 1, 2, 3]
    set_time(store, SHARDS, "expires_at", -1, "shard IN (0, 1)")
    set_time(store, SHARDS, "expires_at", 1, "shard IN (2, 3)")
    assert store.sync_shards("b", range(4), 30) == [0, 1]
    assert [o.owner for o in store.cluster(30)[1]][:4] == ["b", "b", "a", "a"]
    assert store.sync_shards("a", range(4), 30) == [2, 3]  # a renews what it still holds


def test_a_held_shard_is_not_taken_until_released_or_expired(store):
    assert store.sync_shards("a", range(8), 30) == list(range(8))
    assert store.sync_shards("b", [4, 5, 6, 7], 30) == []  # a still holds them
    assert store.sync_shards("a", [0, 1, 2, 3], 30) == [0, 1, 2, 3]  # a hands 4-7 over
    assert store.sync_shards("b", [4, 5, 6, 7], 30) == [4, 5, 6, 7]
    _members, owners = store.cluster(30)
    assert [(o.shard, o.owner) for o in owners] == [(s, "a" if s < 4 else "b") for s in range(8)]
    # julianday() is a float of days: SQLite's seconds carry some 50 µs of rounding.
    assert all(o.expires_in_seconds and 0 < o.expires_in_seconds <= 30.001 for o in owners), owners


def test_a_poller_that_lost_its_shard_can_neither_take_nor_settle_rows_claimed_since(store):
    """What fences a poller whose shard was taken over is the row lease, not the shard lease
    (pool/store/shards.py says why there is no shard token): rows it claimed stay its own while
    their lease holds, and once they were claimed again it can no longer touch them."""
    store.insert_signals(list(generate_signals(24, seed=3)))  # shard 0 of 8: ids 8, 16, 24
    assert store.sync_shards("a", [0], 30) == [0]
    a = store.claim("a", 8, [0], 2, 30)
    assert [r.id for r in a.rows] == [8, 16]
    # a stalls: its shard lease runs out and b takes the shard over.
    set_time(store, SHARDS, "expires_at", -1, "shard = 0")
    assert store.sync_shards("b", [0], 30) == [0]
    b = store.claim("b", 8, [0], 10, 30)
    assert [r.id for r in b.rows] == [24]  # not a's rows: their lease still holds
    assert store.claim("a", 8, [0], 10, 30).rows == []  # a, still believing it holds shard 0
    assert store.ack(a.lease, [8]) == 1  # published under a lease that held: a settles it
    # a stalls past its row lease too: b claims row 16 again and publishes it.
    set_time(store, "signals", "lease_until", -1, "id = 16")
    again = store.claim("b", 8, [0], 10, 30)
    assert [r.id for r in again.rows] == [16] and again.reclaimed == 1
    failure = Failure(id=16, error="late", retry_in=0, dead=True)
    assert (store.ack(a.lease, [16]), store.nack(a.lease, [failure]), store.release(a.lease, [16]),
            store.extend_lease(a.lease, 30)) == (0, 0, 0, 0)
    assert store.ack(again.lease, [16]) == 1 and store.ack(b.lease, [24]) == 1
    assert store.counts().processed == 3


def test_a_shards_table_of_an_earlier_version_with_a_token_column_still_works(store):
    with store.engine.begin() as conn:
        conn.execute(text(f"ALTER TABLE {SHARDS} ADD COLUMN token BIGINT"))
        conn.execute(text(f"UPDATE {SHARDS} SET token = 7"))
    assert store.sync_shards("a", range(8), 30) == list(range(8))
    assert store.sync_shards("a", [0, 1], 30) == [0, 1]
    store.leave("a")
    assert store.sync_shards("b", range(8), 30) == list(range(8))


def test_leave_releases_everything_and_forgets_the_member(store):
    store.member_heartbeat("a/poller-0", "a", 1, 30)
    store.sync_shards("a/poller-0", range(8), 30)
    store.leave("a/poller-0")
    members, owners = store.cluster(30)
    assert members == [] and all(o.owner is None for o in owners)


def test_start_refuses_a_table_without_shard_tables(store):
    with store.engine.begin() as conn:
        conn.execute(text("DROP TABLE signals_pool_members"))
    with pytest.raises(ConfigError, match="signals_pool_members for shard leases not found.*pool init-db"):
        store.check_schema()


def test_a_member_whose_share_is_empty_gives_back_every_shard_it_held(store):
    # More pollers than shards: a poller's share can be nothing, and whatever it held must be
    # free for the pollers whose share it now is, not held until its lease runs out.
    assert store.sync_shards("a", range(8), 30) == list(range(8))
    assert store.sync_shards("a", [], 30) == []
    assert store.sync_shards("b", range(8), 30) == list(range(8))
    assert all(o.owner == "b" for o in store.cluster(30)[1])


def test_keepers_on_the_database_hold_every_shard_once_and_show_their_host_and_pid(store):
    keepers = [ShardKeeper(store, host, "poller-0", 30) for host in ("host-a", "host-b")]
    for _round in range(2):  # the first sees a alone take all; the second, the hand-over to b
        for keeper in keepers:
            keeper.sync()
    members, owners = store.cluster(30)
    assert [(m.member, m.host, m.pid, m.live) for m in members] == [
        (keepers[0].member, "host-a", os.getpid(), True), (keepers[1].member, "host-b", os.getpid(), True)]
    names = [k.member for k in keepers]
    for keeper in keepers:
        assert keeper.held == desired_shards(names, keeper.member, 8) == [
            o.shard for o in owners if o.owner == keeper.member]
    assert sorted(o.shard for o in owners if o.owner in names) == list(range(8))
