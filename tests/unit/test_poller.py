"""Poller: claim -> publish -> ack accepted / nack rejected / release unsent, and a stoppable loop."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError

from pool.poller import (
    BACKOFF_CAP,
    BACKOFF_START,
    REJECTED_RETRY_SECONDS,
    Poller,
    PollerIdentity,
)
from pool.publisher import PublishResult
from pool.store import Claim, ClaimedRow, Lease

IDENTITY = PollerIdentity(owner="host:123:0", index=1, shard_count=3)


def make_rows(*ids: int) -> list[ClaimedRow]:
    return [
        ClaimedRow(id=i, name=f"n{i}", value=float(i), source="s", timestamp=None, attempts=0) for i in ids
    ]


def db_error() -> OperationalError:
    return OperationalError("SELECT 1", {}, Exception("could not connect to server\nDETAIL: noise"))


class FakeStore:
    """Hands out scripted claims and records every ack/nack/release with the lease it got."""

    def __init__(self, batches: Iterable[list[ClaimedRow] | Exception] = (), lost: int = 0) -> None:
        self.batches = list(batches)
        self.lost = lost  # how many acked rows pretend to have lost their lease
        self.claims: list[dict[str, Any]] = []
        self.leases: list[Lease] = []
        self.acks: list[tuple[Lease, list[int]]] = []
        self.nacks: list[tuple[Lease, dict[int, str], float]] = []
        self.releases: list[tuple[Lease, list[int]]] = []
        self.on_claim: Callable[[int], None] = lambda n: None

    def claim(self, owner: str, shard_count: int, shard: int, limit: int, lease_seconds: float) -> Claim:
        self.claims.append(
            {
                "owner": owner,
                "shard_count": shard_count,
                "shard": shard,
                "limit": limit,
                "lease_seconds": lease_seconds,
            }
        )
        self.on_claim(len(self.claims))
        batch = self.batches.pop(0) if self.batches else []
        if isinstance(batch, Exception):
            raise batch
        lease = Lease(owner=owner, token=len(self.claims))
        self.leases.append(lease)
        return Claim(lease=lease, rows=list(batch))

    def ack(self, lease: Lease, ids: Iterable[int]) -> int:
        ids = list(ids)
        self.acks.append((lease, ids))
        return max(len(ids) - self.lost, 0)

    def nack(self, lease: Lease, failures: Mapping[int, str], retry_delay: float) -> int:
        self.nacks.append((lease, dict(failures), retry_delay))
        return len(failures)

    def release(self, lease: Lease, ids: Iterable[int]) -> int:
        ids = list(ids)
        self.releases.append((lease, ids))
        return len(ids)


class FakePublisher:
    """Publishes by a rule: ids in `reject` are rejected, everything from `fail_at` on is unsent."""

    def __init__(
        self,
        reject: Mapping[int, str] | None = None,
        fail_at: int | None = None,
        broker_error: str = "OperationalError: connection refused",
    ) -> None:
        self.reject = dict(reject or {})
        self.fail_at = fail_at
        self.broker_error = broker_error
        self.published: list[list[int]] = []
        self.on_publish: Callable[[Sequence[ClaimedRow]], None] = lambda rows: None

    def publish(self, rows: Sequence[ClaimedRow]) -> PublishResult:
        self.published.append([r.id for r in rows])
        self.on_publish(rows)
        result = PublishResult()
        for position, row in enumerate(rows):
            if self.fail_at is not None and row.id >= self.fail_at:
                result.unsent.extend(r.id for r in rows[position:])
                result.broker_error = self.broker_error
                break
            if row.id in self.reject:
                result.rejected[row.id] = self.reject[row.id]
            else:
                result.accepted.append(row.id)
        return result


class RecordingHooks:
    def __init__(self) -> None:
        self.batches: list[tuple[int, PublishResult, int, float]] = []
        self.database_errors = 0

    def batch_done(self, claimed: int, result: PublishResult, acked: int, seconds: float) -> None:
        self.batches.append((claimed, result, acked, seconds))

    def database_error(self) -> None:
        self.database_errors += 1


class RecordingEvent(threading.Event):
    """A stop event whose waits return at once and are recorded, so the loop runs synchronously."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[float | None] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(timeout)
        return self.is_set()


def make_poller(
    store: FakeStore,
    publisher: FakePublisher,
    batch_size: int = 5,
    stop: threading.Event | None = None,
    hooks: RecordingHooks | None = None,
    poll_interval: float = 0.2,
) -> Poller:
    return Poller(
        store,
        publisher,
        IDENTITY,
        batch_size=batch_size,
        lease_seconds=42.0,
        poll_interval=poll_interval,
        stop=stop or RecordingEvent(),
        hooks=hooks,
    )


# --- run_once ------------------------------------------------------------------------


def test_empty_claim_returns_zero_and_publishes_nothing() -> None:
    store, publisher, hooks = FakeStore([[]]), FakePublisher(), RecordingHooks()
    assert make_poller(store, publisher, hooks=hooks).run_once() == 0
    assert publisher.published == []
    assert store.acks == store.nacks == store.releases == []
    assert hooks.batches == []


def test_claim_uses_identity_batch_size_and_lease_seconds() -> None:
    store = FakeStore([[]])
    make_poller(store, FakePublisher(), batch_size=7).run_once()
    assert store.claims == [
        {"owner": "host:123:0", "shard_count": 3, "shard": 1, "limit": 7, "lease_seconds": 42.0}
    ]


def test_all_accepted_rows_are_acked_with_the_claims_lease() -> None:
    store, publisher = FakeStore([make_rows(1, 2, 3)]), FakePublisher()
    assert make_poller(store, publisher).run_once() == 3
    assert publisher.published == [[1, 2, 3]]
    (lease,) = store.leases
    assert store.acks == [(lease, [1, 2, 3])]
    assert store.acks[0][0] is lease
    assert store.nacks == []
    assert store.releases == []


def test_rejected_rows_are_nacked_with_their_error() -> None:
    store = FakeStore([make_rows(1, 2, 3)])
    publisher = FakePublisher(reject={2: "value is not a finite number (nan)"})
    assert make_poller(store, publisher).run_once() == 3
    (lease,) = store.leases
    assert store.acks == [(lease, [1, 3])]
    assert store.nacks == [(lease, {2: "value is not a finite number (nan)"}, REJECTED_RETRY_SECONDS)]
    assert store.releases == []


def test_unsent_rows_are_released_not_nacked() -> None:
    store = FakeStore([make_rows(1, 2, 3, 4)])
    publisher = FakePublisher(fail_at=3)
    assert make_poller(store, publisher).run_once() == 4
    (lease,) = store.leases
    assert store.acks == [(lease, [1, 2])]
    assert store.releases == [(lease, [3, 4])]
    assert store.nacks == []


def test_mixed_batch_settles_every_row_exactly_once() -> None:
    store = FakeStore([make_rows(1, 2, 3, 4, 5)])
    publisher = FakePublisher(reject={2: "bad timestamp"}, fail_at=4)
    poller = make_poller(store, publisher)
    assert poller.run_once() == 5
    (lease,) = store.leases
    assert store.acks == [(lease, [1, 3])]
    assert store.nacks == [(lease, {2: "bad timestamp"}, REJECTED_RETRY_SECONDS)]
    assert store.releases == [(lease, [4, 5])]
    settled = store.acks[0][1] + list(store.nacks[0][1]) + store.releases[0][1]
    assert sorted(settled) == [1, 2, 3, 4, 5]


def test_nothing_accepted_still_calls_ack_with_no_rows() -> None:
    store = FakeStore([make_rows(1, 2)])
    publisher = FakePublisher(fail_at=1)
    make_poller(store, publisher).run_once()
    assert [ids for _lease, ids in store.acks] in ([], [[]])
    assert store.releases[0][1] == [1, 2]


def test_each_batch_is_settled_under_its_own_lease() -> None:
    store = FakeStore([make_rows(1, 2), make_rows(3)])
    poller = make_poller(store, FakePublisher())
    poller.run_once()
    poller.run_once()
    first, second = store.leases
    assert first != second
    assert store.acks == [(first, [1, 2]), (second, [3])]


def test_full_batch_returns_batch_size() -> None:
    store = FakeStore([make_rows(1, 2, 3, 4, 5)])
    assert make_poller(store, FakePublisher(), batch_size=5).run_once() == 5


def test_hooks_get_claimed_result_and_acked() -> None:
    store, hooks = FakeStore([make_rows(1, 2, 3)]), RecordingHooks()
    make_poller(store, FakePublisher(reject={3: "x"}), hooks=hooks).run_once()
    ((claimed, result, acked, seconds),) = hooks.batches
    assert claimed == 3
    assert result.accepted == [1, 2] and result.rejected == {3: "x"}
    assert acked == 2
    assert seconds >= 0


def test_lost_lease_is_reported_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    store, hooks = FakeStore([make_rows(1, 2, 3)], lost=1), RecordingHooks()
    with caplog.at_level(logging.WARNING, logger="pool.poller"):
        make_poller(store, FakePublisher(), hooks=hooks).run_once()
    assert hooks.batches[0][2] == 2
    assert any("lease lost on 1 of 3" in r.getMessage() for r in caplog.records)


def test_broker_outage_is_logged_once_and_recovery_once(caplog: pytest.LogCaptureFixture) -> None:
    store = FakeStore([make_rows(1), make_rows(2), make_rows(3)])
    publisher = FakePublisher(fail_at=1)
    poller = make_poller(store, publisher)
    with caplog.at_level(logging.INFO, logger="pool.poller"):
        poller.run_once()
        poller.run_once()
        publisher.fail_at = None
        poller.run_once()
    messages = [r.getMessage() for r in caplog.records]
    assert sum("broker unavailable" in m for m in messages) == 1
    assert sum("broker reachable again" in m for m in messages) == 1


def test_database_error_from_claim_propagates_from_run_once() -> None:
    store = FakeStore([db_error()])
    with pytest.raises(OperationalError):
        make_poller(store, FakePublisher()).run_once()


# --- run -----------------------------------------------------------------------------


def test_run_returns_at_once_when_already_stopped() -> None:
    store, stop = FakeStore([make_rows(1)]), RecordingEvent()
    stop.set()
    make_poller(store, FakePublisher(), stop=stop).run()
    assert store.claims == []


def test_run_stops_when_the_stop_event_is_set() -> None:
    stop = RecordingEvent()
    store = FakeStore([make_rows(1), [], make_rows(2)])
    store.on_claim = lambda n: stop.set() if n == 3 else None
    make_poller(store, FakePublisher(), stop=stop).run()
    assert len(store.claims) == 3
    # The batch in flight when stop was set is still finished and acked.
    assert [ids for _lease, ids in store.acks] == [[1], [2]]


def test_run_with_a_real_event_stops_without_sleeping() -> None:
    stop = threading.Event()
    store = FakeStore([make_rows(1, 2)])
    publisher = FakePublisher()
    publisher.on_publish = lambda rows: stop.set()
    make_poller(store, publisher, stop=stop, poll_interval=3600).run()
    assert [ids for _lease, ids in store.acks] == [[1, 2]]
    assert len(store.claims) == 1


def test_in_flight_batch_is_finished_after_stop() -> None:
    stop = RecordingEvent()
    store = FakeStore([make_rows(1, 2, 3)])
    publisher = FakePublisher(reject={2: "bad"}, fail_at=3)
    publisher.on_publish = lambda rows: stop.set()
    make_poller(store, publisher, stop=stop).run()
    assert [ids for _lease, ids in store.acks] == [[1]]
    assert [f for _lease, f, _d in store.nacks] == [{2: "bad"}]
    assert [ids for _lease, ids in store.releases] == [[3]]


def test_full_batches_are_claimed_back_to_back_then_it_rests() -> None:
    stop = RecordingEvent()
    store = FakeStore([make_rows(1, 2), make_rows(3, 4), make_rows(5), []])
    store.on_claim = lambda n: stop.set() if n == 4 else None
    make_poller(store, FakePublisher(), batch_size=2, stop=stop, poll_interval=0.2).run()
    # No wait after the two full batches; a rest of poll_interval after the short one and the empty one.
    assert stop.waits == [0.2, 0.2]


def test_database_errors_back_off_exponentially_up_to_the_cap(caplog: pytest.LogCaptureFixture) -> None:
    stop, hooks = RecordingEvent(), RecordingHooks()
    failures = 10
    store = FakeStore([db_error() for _ in range(failures)] + [make_rows(1)])
    store.on_claim = lambda n: stop.set() if n == failures + 1 else None
    with caplog.at_level(logging.INFO, logger="pool.poller"):
        make_poller(store, FakePublisher(), stop=stop, hooks=hooks).run()
    assert hooks.database_errors == failures
    expected = [min(BACKOFF_START * 2**i, BACKOFF_CAP) for i in range(failures)]
    assert stop.waits[:failures] == expected
    assert max(stop.waits) == BACKOFF_CAP
    assert store.acks[-1][1] == [1]  # recovered and carried on
    messages = [r.getMessage() for r in caplog.records]
    assert sum("database error" in m for m in messages) == 1  # logged once per outage
    assert sum("database reachable again" in m for m in messages) == 1
    assert not any("noise" in m for m in messages)  # only the driver error's first line


def test_database_backoff_resets_after_success() -> None:
    stop = RecordingEvent()
    store = FakeStore([db_error(), db_error(), make_rows(1), db_error(), []])
    store.on_claim = lambda n: stop.set() if n == 5 else None
    make_poller(store, FakePublisher(), batch_size=5, stop=stop, poll_interval=0.2).run()
    assert stop.waits == [BACKOFF_START, BACKOFF_START * 2, 0.2, BACKOFF_START, 0.2]


def test_stop_during_database_backoff_ends_the_loop() -> None:
    stop = RecordingEvent()
    store = FakeStore([db_error()])
    store.on_claim = lambda n: stop.set()
    make_poller(store, FakePublisher(), stop=stop).run()
    assert len(store.claims) == 1
    assert stop.waits == [BACKOFF_START]


def test_broker_outage_backs_off_and_releases_rows() -> None:
    stop = RecordingEvent()
    store = FakeStore([make_rows(1, 2), make_rows(1, 2), make_rows(1, 2), make_rows(1, 2)])
    publisher = FakePublisher(fail_at=1)

    def on_claim(n: int) -> None:
        if n == 3:
            publisher.fail_at = None  # the broker is back
        if n == 4:
            stop.set()

    store.on_claim = on_claim
    make_poller(store, publisher, batch_size=2, stop=stop).run()
    # Two failing batches: broker backoff 0.5 then 1.0; then full batches go back to back.
    assert stop.waits == [BACKOFF_START, BACKOFF_START * 2]
    assert [ids for _lease, ids in store.releases] == [[1, 2], [1, 2]]
    assert [ids for _lease, ids in store.acks if ids] == [[1, 2], [1, 2]]
