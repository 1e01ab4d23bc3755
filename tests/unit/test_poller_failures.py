"""No exception ends a poller: whatever fails in a batch releases its rows at once, is logged once
per state change, and is retried with backoff. And whatever fails while sending is the broker's."""

from __future__ import annotations

import logging
import threading

import pytest
import redis.exceptions
from amqp.exceptions import AccessRefused, NotAllowed, PreconditionFailed

from pool.poller import BACKOFF_START, LeaseHeartbeat
from pool.publisher import BatchPublisher
from pool.store import Lease
from tests.helpers import make_settings as settings_of
from tests.unit.test_poller import FakePublisher, FakeStore, RecordingStop, make_poller, make_rows

SEND_ERRORS = [
    redis.exceptions.ConnectionError("Connection closed by server."),
    redis.exceptions.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"),
    redis.exceptions.AuthenticationError("invalid username-password pair"),
    AccessRefused("ACCESS_REFUSED - Login was refused"),
    NotAllowed("NOT_ALLOWED - vhost gone not found"),
    PreconditionFailed("PRECONDITION_FAILED - inequivalent arg 'durable'"),
    ValueError("Port could not be cast to integer value as 'notaport'"),
    RuntimeError("anything else"),
]


class RaisingPublisher(FakePublisher):
    def __init__(self, errors: list[BaseException]) -> None:
        super().__init__()
        self.errors = errors

    def publish(self, rows, keep_going=lambda: True):
        if self.errors:
            self.published.append([r.id for r in rows])
            raise self.errors.pop(0)
        return super().publish(rows, keep_going)


def test_any_exception_in_a_batch_releases_its_rows_at_once_and_the_loop_goes_on(caplog) -> None:
    stop = RecordingStop()
    store = FakeStore([make_rows(1, 2), make_rows(3), make_rows(4)])
    store.on_claim = lambda n: stop.request() if n == 3 else None
    publisher = RaisingPublisher([RuntimeError("boom\nsecond line"), KeyError("x")])
    with caplog.at_level(logging.INFO, logger="pool.poller"):
        make_poller(store, publisher, stop=stop).run()
    assert store.released_ids() == [[1, 2], [3]]
    assert store.acked_ids() == [[4]]
    assert stop.waits[:2] == [BACKOFF_START, BACKOFF_START * 2]
    assert sum("batch failed, its rows were released" in m for m in caplog.messages) == 1
    assert sum("batches succeed again" in m for m in caplog.messages) == 1
    assert not any("second line" in m for m in caplog.messages)


def test_an_exception_from_the_loop_hooks_does_not_end_the_poller() -> None:
    stop = RecordingStop()
    store = FakeStore([make_rows(1)])
    store.on_claim = lambda n: stop.request()

    class FailingOnceHooks:
        calls = 0

        def loop(self, settings, shards):
            FailingOnceHooks.calls += 1
            if FailingOnceHooks.calls == 1:
                raise OSError(28, "No space left on device")

        def claimed(self, *args): ...
        def batch_done(self, outcome): ...
        def database_error(self): ...
        def backpressure(self, paused): ...

    make_poller(store, stop=stop, hooks=FailingOnceHooks()).run()
    assert store.acked_ids() == [[1]]


class SendingBatchPublisher(BatchPublisher):
    def __init__(self, error: BaseException) -> None:
        super().__init__(settings_of(broker_url="memory://"))
        self.error = error

    def send_batch(self, payloads):
        raise self.error


@pytest.mark.parametrize("error", SEND_ERRORS, ids=lambda e: type(e).__name__)
def test_whatever_the_send_raises_is_a_broker_outage_not_the_rows_fault(error) -> None:
    publisher = SendingBatchPublisher(error)
    try:
        result = publisher.publish(make_rows(1, 2, 3))
    finally:
        publisher.close()
    assert result.unsent == [1, 2, 3] and result.accepted == [] and result.rejected == {}
    assert result.broker_error.startswith(type(error).__name__)


class FlakyLeaseStore:
    def __init__(self) -> None:
        self.calls = 0
        self.extended = threading.Event()

    def extend_lease(self, lease, seconds):
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("not a database error")
        self.extended.set()
        return 1


def test_the_lease_heartbeat_outlives_an_error_that_is_not_a_database_error() -> None:
    store = FlakyLeaseStore()
    heartbeat = LeaseHeartbeat(store, 0.03)
    try:
        with heartbeat.holding(Lease(owner="me", token=1)):
            assert store.extended.wait(10), "the heartbeat thread died on the first error"
    finally:
        heartbeat.close()
