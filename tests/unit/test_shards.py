"""Shard shares: who should hold what, and how ShardKeepers converge on it through leases.

The fake lease store below keeps the database's rules (an owner keeps or renews its lease, a
free or expired shard can be taken, a silent member drops out after its ttl) on a fake clock;
the real SQL is tested against PostgreSQL and SQLite in tests/integration/test_shard_leases.py.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Sequence

import pytest
from sqlalchemy.exc import OperationalError

import pool.shards
from pool.shards import ShardKeeper, desired_shards, host_id, member_name, member_slot

SHARDS = 64
TTL = 3.0


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeLeaseStore:
    def __init__(self, clock: Clock, shards: int = SHARDS) -> None:
        self.clock = clock
        self.shards = shards
        self.heartbeats: dict[str, float] = {}
        self.leases: dict[int, tuple[str, float]] = {}  # shard -> (owner, expires)
        self.failing = False
        self.tries = 0  # heartbeats tried, failed ones too: the load a keeper puts on the database

    def shard_count(self) -> int:
        return self.shards

    def member_heartbeat(self, member: str, host: str, pid: int, ttl: float) -> list[str]:
        self.tries += 1
        self._maybe_fail()
        self.heartbeats[member] = self.clock.now
        return sorted(m for m, at in self.heartbeats.items() if at >= self.clock.now - ttl)

    def sync_shards(self, member: str, desired: Sequence[int], ttl: float) -> list[int]:
        self._maybe_fail()
        now = self.clock.now
        for shard, (owner, _expires) in list(self.leases.items()):
            if owner == member and shard not in desired:
                del self.leases[shard]
        for shard in desired:
            owner, expires = self.leases.get(shard, (None, 0.0))
            if owner in (None, member) or expires < now:
                self.leases[shard] = (member, now + ttl)
        return sorted(s for s, (owner, _e) in self.leases.items() if owner == member)

    def leave(self, member: str) -> None:
        self._maybe_fail()
        self.leases = {s: lease for s, lease in self.leases.items() if lease[0] != member}
        self.heartbeats.pop(member, None)

    def owners(self) -> dict[str, int]:
        """Shards held per live lease owner, named "<host>/<slot>" when the nonce is left out."""
        counts: dict[str, int] = {}
        for owner, expires in self.leases.values():
            if expires >= self.clock.now:
                counts[owner] = counts.get(owner, 0) + 1
        return counts

    def owners_by_slot(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for owner, held in self.owners().items():
            name = owner.rsplit("/", 1)[0]
            counts[name] = counts.get(name, 0) + held
        return counts

    def _maybe_fail(self) -> None:
        if self.failing:
            raise OperationalError("SELECT 1", {}, Exception("connection refused"))


def run(keepers: list[ShardKeeper], clock: Clock, seconds: float, step: float = 0.05) -> None:
    """Every keeper asks for its shards each step, as pollers do between batches."""
    end = clock.now + seconds
    while clock.now < end:
        for keeper in keepers:
            keeper.shards()
        clock.now += step


SHARE_IN_A_PROCESS = """
import json, sys
from pool.shards import desired_shards
members, me = json.loads(sys.argv[1]), sys.argv[2]
print(json.dumps(desired_shards(set(members), me, 64)))
"""


def test_every_process_computes_the_same_split_whatever_its_hash_seed() -> None:
    # Pollers are separate processes with their own string hashing: a split that followed a
    # set's order would differ between them, and some shards would be wanted by no poller.
    members = [f"host-{h}/poller-{k}/{h}{k}ab" for h in "abc" for k in range(3)]
    shares = []
    for seed, me in enumerate(members):
        done = subprocess.run([sys.executable, "-c", SHARE_IN_A_PROCESS, json.dumps(members), me],
                              env={**os.environ, "PYTHONHASHSEED": str(seed + 1)}, capture_output=True,
                              text=True, check=True)
        shares.append(json.loads(done.stdout))
    assert sorted(s for share in shares for s in share) == list(range(64))


def test_desired_shares_are_disjoint_near_equal_and_cover_every_shard() -> None:
    members = ["b/poller-0", "a/poller-1", "a/poller-0"]
    shares = [desired_shards(members, m, SHARDS) for m in members]
    assert sorted(s for share in shares for s in share) == list(range(SHARDS))
    assert sorted(len(share) for share in shares) == [21, 21, 22]
    # A member not (yet) in the list counts itself in.
    assert desired_shards([], "solo/poller-0", 4) == [0, 1, 2, 3]


def test_pollers_started_together_settle_on_equal_shares_within_a_second() -> None:
    clock = Clock()
    store = FakeLeaseStore(clock)
    keepers = [ShardKeeper(store, "h", f"poller-{k}", TTL, clock=clock) for k in range(8)]
    run(keepers, clock, 1.0)
    assert sorted(store.owners().values()) == [8] * 8
    assert sorted(s for k in keepers for s in k.shards()) == list(range(SHARDS))


def test_a_dead_pollers_shards_are_taken_over_after_its_lease_and_given_back_when_it_returns() -> None:
    clock = Clock()
    store = FakeLeaseStore(clock)
    a, b = (ShardKeeper(store, host, "poller-0", TTL, clock=clock) for host in ("a", "b"))
    run([a, b], clock, 1.0)
    assert store.owners_by_slot() == {"a/poller-0": 32, "b/poller-0": 32}
    run([a], clock, 1.0)  # b is silent, but its leases (renewed within the last second) still hold
    assert store.owners()[b.member] == 32 and len(a.shards()) == 32
    run([a], clock, TTL + 0.5)  # lease expiry plus a sync: a takes them over
    assert store.owners() == {a.member: 64}
    b2 = ShardKeeper(store, "b", "poller-0", TTL, clock=clock)
    run([a, b2], clock, 1.0)
    assert store.owners() == {a.member: 32, b2.member: 32}


def test_leave_hands_the_shards_over_at_once() -> None:
    clock = Clock()
    store = FakeLeaseStore(clock)
    a, b = (ShardKeeper(store, host, "poller-0", TTL, clock=clock) for host in ("a", "b"))
    run([a, b], clock, 1.0)
    b.leave()
    assert b.held == []
    run([a], clock, 1.0)
    assert store.owners() == {a.member: 64}


def test_a_database_outage_keeps_the_shards_only_while_their_leases_surely_hold() -> None:
    clock = Clock()
    store = FakeLeaseStore(clock)
    keeper = ShardKeeper(store, "a", "poller-0", TTL, clock=clock)
    run([keeper], clock, 1.0)
    store.failing = True
    clock.now += 1.0
    with pytest.raises(OperationalError):
        keeper.shards()
    assert len(keeper.held) == SHARDS
    clock.now += TTL
    with pytest.raises(OperationalError):
        keeper.shards()
    assert keeper.shards() == []  # its leases may have expired: claim nothing
    store.failing = False
    clock.now += 1.0  # the next try, at most a second later
    assert len(keeper.shards()) == SHARDS  # it came back and renewed


def test_host_id_and_member_names() -> None:
    assert host_id("web-1") == "web-1"
    assert host_id("") != ""
    assert member_name("web-1", "poller-3", "ab12") == "web-1/poller-3/ab12"
    assert member_slot("web-1/poller-3/ab12") == "poller-3"


def test_every_process_is_a_member_of_its_own_even_with_one_host_id_and_slot() -> None:
    """Two `pool start --host-id same --workers 2`: four processes, four members, four shares."""
    clock = Clock()
    store = FakeLeaseStore(clock)
    keepers = [ShardKeeper(store, "same", f"poller-{k}", TTL, clock=clock)
               for _pool_start in range(2) for k in range(2)]
    assert len({k.member for k in keepers}) == 4
    run(keepers, clock, 1.0)
    shares = [k.shards() for k in keepers]
    assert sorted(len(share) for share in shares) == [16] * 4
    assert sorted(s for share in shares for s in share) == list(range(SHARDS))  # no shard twice or unowned


def test_a_restarted_poller_takes_over_its_predecessors_shards_at_once() -> None:
    """A new process in a slot (its predecessor was killed) replaces the old member at its first
    sync: no ghost holds shards, or counts in everybody's share, until its lease runs out."""
    clock = Clock()
    store = FakeLeaseStore(clock)
    a, b = (ShardKeeper(store, host, "poller-0", TTL, clock=clock) for host in ("a", "b"))
    run([a, b], clock, 1.0)
    assert store.owners() == {a.member: 32, b.member: 32}
    b_again = ShardKeeper(store, "b", "poller-0", TTL, clock=clock, replaces=b.member)  # b was SIGKILLed
    run([a, b_again], clock, 0.2)
    assert store.owners() == {a.member: 32, b_again.member: 32}
    assert b.member not in store.heartbeats
    # Without the hand-over, the killed member's shards would wait out its lease.
    c = ShardKeeper(store, "c", "poller-0", TTL, clock=clock)
    run([a, b_again, c], clock, 1.0)
    c_again = ShardKeeper(store, "c", "poller-0", TTL, clock=clock)
    run([a, b_again, c_again], clock, 0.5)
    assert store.owners()[c.member] > 0


def test_a_keeper_renews_every_third_of_a_short_ttl_and_retries_as_soon_after_a_failure() -> None:
    # With a shard lease under 3 s, syncing only every second would let a lease that one missed
    # sync puts at risk run out before the next try.
    clock = Clock()
    store = FakeLeaseStore(clock)
    ttl = 1.5
    keeper = ShardKeeper(store, "a", "poller-0", ttl, clock=clock)
    keeper.shards()
    clock.now += 0.1  # shares were moving: a second sync settles them
    keeper.shards()
    settled_at = store.heartbeats[keeper.member]
    clock.now = settled_at + ttl / 3
    keeper.shards()
    assert store.heartbeats[keeper.member] == settled_at + ttl / 3, "no renewal a third of a ttl later"
    store.failing = True
    clock.now += ttl / 3
    with pytest.raises(OperationalError):
        keeper.shards()
    clock.now += ttl / 3
    with pytest.raises(OperationalError):  # tried again a third of a ttl after the failure
        keeper.shards()


class SlowLeaseStore(FakeLeaseStore):
    """Each shard sync takes `round_trip` seconds of the clock."""

    round_trip = 0.0

    def sync_shards(self, member: str, desired: Sequence[int], ttl: float) -> list[int]:
        held = super().sync_shards(member, desired, ttl)
        self.clock.now += self.round_trip
        return held


def test_a_keeper_counts_its_leases_from_when_the_sync_began() -> None:
    # The database renewed the leases at some moment of a slow round trip: they surely hold only
    # a ttl from its start. Counted from its end, a keeper that can no longer renew would claim
    # from shards that may already be another's.
    clock = Clock()
    store = SlowLeaseStore(clock)
    keeper = ShardKeeper(store, "a", "poller-0", TTL, clock=clock)
    run([keeper], clock, 1.0)
    store.round_trip = 0.5
    clock.now = store.heartbeats[keeper.member] + 1.0  # the next renewal is due
    keeper.shards()
    renewed_at = store.heartbeats[keeper.member]
    store.failing = True
    clock.now = renewed_at + TTL - 0.01
    with pytest.raises(OperationalError):
        keeper.shards()
    assert len(keeper.shards()) == SHARDS  # still surely ours
    clock.now = renewed_at + TTL + 0.01
    assert keeper.shards() == [], "claims from shards whose leases may have run out"


# A step the binary floats hold exactly, so that sync times fall on it without rounding drift.
EXACT_STEP = 1 / 16


@pytest.mark.parametrize(("ttl", "every"), [(3.0, 1.0), (1.5, 0.5), (30.0, 1.0)])
def test_a_settled_keeper_renews_once_a_second_or_a_third_of_its_ttl_not_on_every_batch(
        ttl: float, every: float) -> None:
    # Each renewal is a few statements against the shared database, from every poller: a keeper
    # that renewed on every batch, or kept the 0.1 s pace of moving shares, would multiply that
    # load; one that renewed less often than a third of a ttl would let a missed sync cost leases.
    clock = Clock()
    store = FakeLeaseStore(clock)
    keepers = [ShardKeeper(store, host, "poller-0", ttl, clock=clock) for host in ("a", "b")]
    run(keepers, clock, 2.0, step=EXACT_STEP)
    assert sorted(store.owners().values()) == [32, 32]
    store.tries = 0
    run(keepers, clock, 12.0, step=EXACT_STEP)
    assert store.tries == 2 * 12.0 / every


def test_a_keeper_retries_a_failed_sync_after_a_third_of_its_ttl_not_on_every_batch() -> None:
    clock = Clock()
    store = FakeLeaseStore(clock)
    keeper = ShardKeeper(store, "a", "poller-0", TTL, clock=clock)
    run([keeper], clock, 2.0, step=EXACT_STEP)
    store.failing, store.tries = True, 0
    failures = 0
    while clock.now < 20.0:
        try:
            keeper.shards()
        except OperationalError:
            failures += 1
        clock.now += EXACT_STEP
    assert failures == store.tries == 18  # one a second (TTL / 3) from t=2 to t=20


def test_a_keeper_whose_database_is_down_at_start_claims_nothing_until_a_sync_succeeds() -> None:
    clock = Clock()
    store = FakeLeaseStore(clock)
    store.failing = True
    keeper = ShardKeeper(store, "a", "poller-0", TTL, clock=clock)
    assert keeper.held == []  # the poller reports its shard count before the first sync
    with pytest.raises(OperationalError):
        keeper.shards()
    clock.now += 0.1  # the poller's next turn, before the retry is due
    assert keeper.shards() == [] and keeper.held == []
    store.failing = False
    clock.now += 1.0
    assert len(keeper.shards()) == SHARDS


def share_lines(caplog: pytest.LogCaptureFixture) -> list[tuple[str, dict]]:
    return [(r.getMessage(), r.fields) for r in caplog.records
            if r.name == "pool.shards" and getattr(r, "fields", {}).get("event") == "shards_changed"]


def test_a_keeper_logs_its_share_when_it_changes_and_only_then(caplog: pytest.LogCaptureFixture) -> None:
    # Operators follow a rebalance in these lines; the fields are what log search filters on.
    caplog.set_level(logging.INFO, logger="pool.shards")
    clock = Clock()
    store = FakeLeaseStore(clock)
    a = ShardKeeper(store, "a", "poller-0", TTL, clock=clock)
    run([a], clock, 2.0)
    first16 = ", ".join(str(s) for s in range(16))
    assert share_lines(caplog) == [(f"holding 64 of 64 shards (1 pollers live): {first16} …",
                                    {"event": "shards_changed", "shards": 64, "members": 1})]
    others = [ShardKeeper(store, host, "poller-0", TTL, clock=clock) for host in "bcd"]
    run(others, clock, 0.2)  # they join, but a still holds every shard: nothing changes for them
    assert len(share_lines(caplog)) == 1
    caplog.clear()
    run([a], clock, 1.2)  # a's next renewal sees four members and keeps a quarter
    every4th = ", ".join(str(s) for s in range(0, 64, 4))
    assert share_lines(caplog) == [(f"holding 16 of 64 shards (4 pollers live): {every4th}",
                                    {"event": "shards_changed", "shards": 16, "members": 4})]
    caplog.clear()
    run([a, *others], clock, 3.0)
    lines = share_lines(caplog)
    assert sorted(fields["shards"] for _message, fields in lines) == [16, 16, 16]  # b, c, d once each


def test_a_keepers_share_line_lists_at_most_16_shards_and_says_none_when_it_holds_none(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pool.shards")
    clock = Clock()
    seventeen = ShardKeeper(FakeLeaseStore(clock, shards=17), "a", "poller-0", TTL, clock=clock)
    seventeen.shards()
    first16 = ", ".join(str(s) for s in range(16))
    assert [m for m, _f in share_lines(caplog)] == [f"holding 17 of 17 shards (1 pollers live): {first16} …"]
    caplog.clear()
    store = FakeLeaseStore(clock, shards=1)
    b = ShardKeeper(store, "b", "poller-0", TTL, clock=clock)
    run([b], clock, 0.5)
    a = ShardKeeper(store, "a", "poller-0", TTL, clock=clock)  # sorts first: shard 0 is its own
    run([a, b], clock, 1.5)
    assert store.owners() == {a.member: 1}
    assert [m for m, _f in share_lines(caplog)] == ["holding 1 of 1 shards (1 pollers live): 0",
                                                    "holding 0 of 1 shards (2 pollers live): none",
                                                    "holding 1 of 1 shards (2 pollers live): 0"]


def test_a_restarted_poller_says_which_process_it_took_over_from(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pool.shards")
    clock = Clock()
    store = FakeLeaseStore(clock)
    old = ShardKeeper(store, "b", "poller-0", TTL, clock=clock)
    run([old], clock, 0.5)
    new = ShardKeeper(store, "b", "poller-0", TTL, clock=clock, replaces=old.member)
    run([new], clock, 0.5)
    took_over = [r.getMessage() for r in caplog.records if "took over" in r.getMessage()]
    assert took_over == [f"took over from {old.member}, this slot's previous process"]
    assert store.owners() == {new.member: SHARDS}


def test_a_keeper_that_cannot_hand_its_shards_back_says_when_they_expire(
        caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    store = FakeLeaseStore(clock)
    keeper = ShardKeeper(store, "a", "poller-0", TTL, clock=clock)
    run([keeper], clock, 1.0)
    store.failing = True
    keeper.leave()  # a stop while the database is down must not raise
    assert keeper.held == []
    assert [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "pool.shards"] == [
        (logging.WARNING, "could not release shards on the way out (they expire in 3 s): OperationalError")]


def test_a_host_id_from_the_machine_name_is_safe_in_member_names(monkeypatch: pytest.MonkeyPatch) -> None:
    # The host id is the first part of "<host id>/<slot>/<nonce>": a "/" in it would shift the
    # slot that status groups members by.
    for hostname, expected in (("Web Host#1/eu.example", "Web-Host-1-eu.example"),
                               ("n" * 150, "n" * 100), ("", "host")):
        monkeypatch.setattr(pool.shards.socket, "gethostname", lambda name=hostname: name)
        assert host_id("") == expected
    assert host_id("configured") == "configured"


def test_the_slot_of_a_member_name_without_a_nonce_or_without_any_slot() -> None:
    assert member_slot("web-1/poller-3") == "poller-3"  # a name from before nonces
    assert member_slot("solo") == "solo"
