"""The poller against a real SQLite store: a failed batch is given back at once, and a batch
worked on for longer than its lease stays with its poller."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import pytest
from sqlalchemy import text

from pool.poller import Poller, PollerIdentity, StopSignal
from pool.publisher import PublishResult
from pool.seeding import generate_signals
from pool.store import ClaimedRow, open_store
from tests.helpers import make_settings

LEASE = 1.0  # the shortest lease the settings allow


@pytest.fixture
def stores(sqlite_url):
    """This poller's store and another poller's, on one database file as separate processes
    would have them."""
    ours = open_store(make_settings(db_url=sqlite_url))
    ours.init_schema()
    theirs = open_store(make_settings(db_url=sqlite_url))
    yield ours, theirs
    ours.close()
    theirs.close()


def poller_on(store, publisher, **settings) -> Poller:
    return Poller(store, publisher, PollerIdentity(owner="ours", index=0, shard_count=1),
                  make_settings(db_url="sqlite://", **settings), StopSignal())


def processed_ids(store) -> list[int]:
    with store.engine.connect() as conn:
        return [r[0] for r in conn.execute(text("SELECT id FROM signals WHERE processed = 1 ORDER BY id"))]


class CallbackPublisher:
    """Accepts every row once `during(rows)` returns, or raises what it raises."""

    def __init__(self, during: Callable[[Sequence[ClaimedRow]], None]) -> None:
        self.during = during
        self.published: list[list[int]] = []

    def publish(self, rows, keep_going=lambda: True) -> PublishResult:
        self.published.append([r.id for r in rows])
        self.during(rows)
        return PublishResult(accepted=[r.id for r in rows])


def test_a_batch_that_fails_mid_run_is_claimable_by_another_poller_at_once(stores) -> None:
    ours, theirs = stores
    ours.insert_signals(list(generate_signals(6, seed=3)))

    def fail_second(rows) -> None:
        if len(publisher.published) == 2:
            raise ConnectionError("broker lost mid-run")

    publisher = CallbackPublisher(fail_second)
    poller = poller_on(ours, publisher, batch_size=3, lease_seconds=60)
    try:
        assert poller.run_once() == 3
        with pytest.raises(ConnectionError):
            poller.run_once()
    finally:
        poller.close()
    # The lease has 60 s to run: only a release lets another poller have the rows now, and as
    # free rows, not as rows taken over from an expired lease.
    claim = theirs.claim("theirs", 1, 0, 10, 60)
    assert [r.id for r in claim.rows] == [4, 5, 6]
    assert claim.reclaimed == 0
    assert processed_ids(ours) == [1, 2, 3]


def test_a_batch_worked_on_longer_than_its_lease_stays_with_its_poller(stores) -> None:
    ours, theirs = stores
    ours.insert_signals(list(generate_signals(4, seed=5)))
    taken: list[int] = []

    def slow_broker(rows) -> None:
        # Meanwhile another poller claims again and again, for 2.5 leases: the heartbeat must
        # keep our lease ahead of every one of its claims.
        until = time.monotonic() + 2.5 * LEASE
        while time.monotonic() < until:
            taken.extend(r.id for r in theirs.claim("theirs", 1, 0, 10, 60).rows)
            time.sleep(0.05)

    poller = poller_on(ours, CallbackPublisher(slow_broker), batch_size=10, lease_seconds=LEASE)
    try:
        assert poller.run_once() == 4
    finally:
        poller.close()
    assert taken == []
    assert processed_ids(ours) == [1, 2, 3, 4]  # acked under the lease it still held
