"""A poller that recovered from an outage handles the next one as it did the first, and what it
reports about a batch's timing is what the batch took."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError

from pool.poller import BACKOFF_START, BatchOutcome
from tests.unit.test_poller import (  # noqa: F401 - clock is a fixture
    FakeClock,
    FakePublisher,
    FakeStore,
    RecordingStop,
    clock,
    db_error,
    fields_of,
    make_poller,
    make_rows,
)


def test_a_second_broker_outage_backs_off_from_the_start_again_and_every_row_goes_out() -> None:
    stop = RecordingStop()
    store = FakeStore([make_rows(1, 2), make_rows(1, 2), make_rows(1, 2),
                       make_rows(3, 4), make_rows(3, 4), make_rows(3, 4)])
    publisher = FakePublisher(fail_at=1)
    # claims 1-2: broker down; 3: back; 4-5: down again; 6: back
    down = {1: True, 3: False, 4: True, 6: False}

    def on_claim(n: int) -> None:
        if n in down:
            publisher.fail_at = 1 if down[n] else None
        if n == 6:
            stop.request()

    store.on_claim = on_claim
    make_poller(store, publisher, stop=stop, batch_size=2).run()
    assert stop.waits == [BACKOFF_START, BACKOFF_START * 2, BACKOFF_START, BACKOFF_START * 2]
    assert store.acked_ids() == [[1, 2], [3, 4]]


class FailingCalls(FakePublisher):
    """Raises on the given calls (counted from 1), publishes on the others."""

    def __init__(self, failing: set[int]) -> None:
        super().__init__()
        self.failing = failing

    def publish(self, rows, keep_going=lambda: True):
        if len(self.published) + 1 in self.failing:
            self.published.append([r.id for r in rows])
            raise RuntimeError(f"call {len(self.published)}")
        return super().publish(rows, keep_going)


def test_a_second_failing_spell_backs_off_from_the_start_again_and_every_row_goes_out() -> None:
    stop = RecordingStop()
    store = FakeStore([make_rows(1, 2), make_rows(1, 2), make_rows(1, 2),
                       make_rows(3, 4), make_rows(3, 4)])
    store.on_claim = lambda n: stop.request() if n == 5 else None
    publisher = FailingCalls({1, 2, 4})  # batches 3 and 5 go out
    make_poller(store, publisher, stop=stop, batch_size=2).run()
    assert stop.waits == [BACKOFF_START, BACKOFF_START * 2, BACKOFF_START]
    assert store.acked_ids() == [[1, 2], [3, 4]]


class TimingHooks:
    def __init__(self) -> None:
        self.claim_seconds: list[float] = []
        self.outcomes: list[BatchOutcome] = []

    def loop(self, settings: Any, shards: int) -> None: ...

    def claimed(self, rows: int, reclaimed: int, seconds: float) -> None:
        self.claim_seconds.append(seconds)

    def batch_done(self, outcome: BatchOutcome) -> None:
        self.outcomes.append(outcome)

    def database_error(self) -> None: ...

    def backpressure(self, paused: bool) -> None: ...


def test_claim_and_batch_durations_are_what_each_step_took(clock: FakeClock) -> None:  # noqa: F811
    store = FakeStore([make_rows(1, 2)])
    store.on_claim = lambda n: clock.sleep(1.0)  # the claim takes 1 s
    publisher = FakePublisher()
    publisher.after_row = lambda row_id: clock.sleep(1.0)  # 1 s a row
    acked = store.ack

    def slow_ack(lease, ids):
        clock.sleep(0.25)
        return acked(lease, ids)

    store.ack = slow_ack
    hooks = TimingHooks()
    poller = make_poller(store, publisher, hooks=hooks)
    try:
        assert poller.run_once() == 2
    finally:
        poller.close()
    assert hooks.claim_seconds == [1.0]
    [outcome] = hooks.outcomes
    assert (outcome.seconds, outcome.publish_seconds, outcome.settle_seconds) == (3.25, 2.0, 0.25)


def test_after_the_kept_ack_is_made_the_poller_goes_on_relaying(clock: FakeClock) -> None:  # noqa: F811
    # Lease 3 s: the ack of rows 1 and 2 gives up after three tries and is kept; made once the
    # database answers, it is done with: later batches go out as usual.
    store = FakeStore([make_rows(1, 2), make_rows(3), make_rows(4)])
    store.errors["ack"] = [db_error() for _ in range(3)]
    poller = make_poller(store, lease_seconds=3, batch_size=2)
    try:
        with pytest.raises(OperationalError):
            poller.run_once()
        assert poller.run_once() == 1
        assert poller.run_once() == 1
    finally:
        poller.close()
    assert store.acked_ids() == [[1, 2], [3], [4]]


def test_a_failing_batch_is_logged_once_with_its_error_and_recovery_once(caplog) -> None:
    stop = RecordingStop()
    store = FakeStore([make_rows(1, 2), make_rows(1, 2), make_rows(3, 4), make_rows(5, 6)])
    store.on_claim = lambda n: stop.request() if n == 4 else None
    with caplog.at_level(logging.INFO, logger="pool.poller"):
        make_poller(store, FailingCalls({1}), stop=stop, batch_size=2).run()
    assert fields_of(caplog, "batch failed") == [{"event": "batch_failed", "error": "RuntimeError: call 1"}]
    assert [m for m in caplog.messages if "batch failed" in m] == [
        "batch failed, its rows were released; retrying with backoff: RuntimeError: call 1"
    ]
    # three batches go out after it: the recovery is one line, not one per batch
    assert len(fields_of(caplog, "batches succeed again")) == 1
    assert store.acked_ids() == [[1, 2], [3, 4], [5, 6]]


def test_a_database_recovery_is_logged_once_however_many_batches_follow(caplog) -> None:
    stop = RecordingStop()
    store = FakeStore([db_error(), make_rows(1, 2), make_rows(3, 4), make_rows(5, 6)])
    store.on_claim = lambda n: stop.request() if n == 4 else None
    with caplog.at_level(logging.INFO, logger="pool.poller"):
        make_poller(store, stop=stop, batch_size=2).run()
    assert len(fields_of(caplog, "database reachable again")) == 1
    assert store.acked_ids() == [[1, 2], [3, 4], [5, 6]]


def test_no_settling_retry_ends_at_the_instant_the_lease_does(clock: FakeClock) -> None:  # noqa: F811
    # Lease 3.5 s from t=0: retries at 0.5 and 1.5; one more after 2 s would run at t=3.5, the
    # very instant the lease may pass to another poller.
    store = FakeStore([make_rows(1)])
    store.errors["ack"] = [db_error() for _ in range(10)]
    with pytest.raises(OperationalError):
        make_poller(store, lease_seconds=3.5).run_once()
    assert clock.sleeps == [0.5, 1.0]
