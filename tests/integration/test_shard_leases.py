"""The shard lease and membership SQL on PostgreSQL and SQLite (the database's clock decides)."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from pool.errors import ConfigError
from pool.store import open_store
from tests.helpers import make_settings, wait_until


@pytest.fixture(params=["postgresql", "sqlite"])
def db_url(request):
    return request.getfixturevalue("pg_url" if request.param == "postgresql" else "sqlite_url")


@pytest.fixture
def store(db_url):
    store = open_store(make_settings(db_url=db_url, shards="8"))
    store.init_schema()
    yield store
    store.close()


def tokens(store) -> dict[int, int]:
    with store.engine.connect() as conn:
        return {r[0]: r[1] for r in conn.execute(text("SELECT shard, token FROM signals_pool_shards"))}


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
    ttl = 1.5
    store.member_heartbeat("h/poller-0/old", "h", 1, ttl)
    store.member_heartbeat("h/poller-1/other", "h", 2, ttl)

    def members_after_a_beat() -> list[str] | None:
        store.member_heartbeat("h/poller-0/twin", "h", 3, ttl)  # a live duplicate stays
        store.member_heartbeat("h/poller-0/new", "h", 4, ttl)
        names = [m.member for m in store.cluster(ttl)[0]]
        return None if "h/poller-0/old" in names else names

    # Within 2 ttl (everything silent is forgotten only after 3 ttl): one ttl plus a beat.
    names = wait_until(members_after_a_beat, timeout=2 * ttl + 0.5, interval=0.1,
                       message="the old poller-0 forgotten")
    assert names == ["h/poller-0/new", "h/poller-0/twin", "h/poller-1/other"]  # another slot stays


def test_a_held_shard_is_not_taken_until_released_or_expired(store):
    assert store.sync_shards("a", range(8), 30) == list(range(8))
    assert store.sync_shards("b", [4, 5, 6, 7], 30) == []  # a still holds them
    assert store.sync_shards("a", [0, 1, 2, 3], 30) == [0, 1, 2, 3]  # a hands 4-7 over
    assert store.sync_shards("b", [4, 5, 6, 7], 30) == [4, 5, 6, 7]
    _members, owners = store.cluster(30)
    assert [o.owner for o in owners] == ["a"] * 4 + ["b"] * 4
    assert all(o.expires_in_seconds and 0 < o.expires_in_seconds <= 30 for o in owners)


def test_renewal_keeps_the_token_and_a_takeover_after_expiry_gets_a_new_one(store):
    store.sync_shards("a", [0, 1], 1.0)
    first = tokens(store)
    store.sync_shards("a", [0, 1], 1.0)
    assert tokens(store) == first  # kept by its holder: same fencing token
    # On the database clock, a's leases run out; b takes the shards with fresh tokens.
    taken = wait_until(lambda: store.sync_shards("b", [0, 1], 30) or None, timeout=10, interval=0.2,
                       message="a's leases to expire")
    assert taken == [0, 1]
    assert tokens(store)[0] != first[0] and tokens(store)[1] != first[1]
    assert store.sync_shards("a", [0, 1], 30) == []


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
