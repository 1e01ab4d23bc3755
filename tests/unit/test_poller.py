"""Poller: claim -> publish -> ack accepted / nack rejected / release unsent, and a stoppable loop.

Everything runs synchronously against fakes: the stop signal's waits return at once and are
recorded, settling retries sleep on a fake clock, and backpressure depths come from a script.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError

import pool.poller
from pool.config import Settings, load_settings
from pool.poller import (
    BACKOFF_CAP,
    BACKOFF_START,
    DEPTH_CHECK_INTERVAL,
    BatchOutcome,
    FixedShards,
    LeaseHeartbeat,
    Poller,
    PollerIdentity,
    StopSignal,
)
from pool.publisher import PublishResult
from pool.store import Claim, ClaimedRow, Lease
from pool.store.base import Failure
from tests.helpers import SteppedClock, move_clock

IDENTITY = PollerIdentity(owner="host:123:0", index=1, shard_count=3)

# Test settings: retries of 2 s doubling up to 10 s, the third failed attempt is fatal.
BASE, CAP, MAX_ATTEMPTS = 2.0, 10.0, 3


def make_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "batch_size": 5,
        "lease_seconds": 42,
        "poll_interval": 0.2,
        "retry_base_seconds": BASE,
        "retry_cap_seconds": CAP,
        "max_attempts": MAX_ATTEMPTS,
        "backpressure_high": 0,
    }
    values.update(overrides)
    return load_settings(environ={}, overrides=values)


def make_rows(*ids: int, attempts: Mapping[int, int] | None = None) -> list[ClaimedRow]:
    attempts = attempts or {}
    return [
        ClaimedRow(
            id=i, name=f"n{i}", value=float(i), source="s", timestamp=None, attempts=attempts.get(i, 0)
        )
        for i in ids
    ]


def db_error(message: str = "could not connect to server\nDETAIL: noise") -> OperationalError:
    return OperationalError("SELECT 1", {}, Exception(message))


def capped_exponential(attempt: int) -> float:
    return min(CAP, BASE * 2 ** (attempt - 1))


# --- fakes ---------------------------------------------------------------------------


class FakeStore:
    """Hands out scripted claims and records every settling call with the lease it got."""

    def __init__(self, batches: Iterable[list[ClaimedRow] | Exception] = (), lost: int = 0) -> None:
        self.batches = list(batches)
        self.lost = lost  # how many acked rows pretend to have lost their lease
        self.claims: list[dict[str, Any]] = []
        self.leases: list[Lease] = []
        self.acks: list[tuple[Lease, list[int]]] = []
        self.nacks: list[tuple[Lease, list[Failure]]] = []
        self.releases: list[tuple[Lease, list[int]]] = []
        self.extends: list[tuple[Lease, float]] = []
        self.calls: dict[str, int] = {"ack": 0, "nack": 0, "release": 0}
        # method name -> errors its next calls raise, in order, before it succeeds
        self.errors: dict[str, list[Exception]] = {"ack": [], "nack": [], "release": []}
        self.on_claim: Callable[[int], None] = lambda n: None

    def wake_listener(self) -> None:
        return None  # like SQLite: idle pollers sleep out the poll interval

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

    def _maybe_fail(self, method: str) -> None:
        self.calls[method] += 1
        if self.errors[method]:
            raise self.errors[method].pop(0)

    def ack(self, lease: Lease, ids: Iterable[int]) -> int:
        self._maybe_fail("ack")
        ids = list(ids)
        self.acks.append((lease, ids))
        return max(len(ids) - self.lost, 0)

    def nack(self, lease: Lease, failures: Sequence[Failure]) -> int:
        self._maybe_fail("nack")
        self.nacks.append((lease, list(failures)))
        return len(failures)

    def release(self, lease: Lease, ids: Iterable[int]) -> int:
        self._maybe_fail("release")
        ids = list(ids)
        self.releases.append((lease, ids))
        return len(ids)

    def extend_lease(self, lease: Lease, lease_seconds: float) -> int:
        self.extends.append((lease, lease_seconds))
        return 1

    # what was settled, without the leases
    def acked_ids(self) -> list[list[int]]:
        return [ids for _lease, ids in self.acks if ids]

    def released_ids(self) -> list[list[int]]:
        return [ids for _lease, ids in self.releases]


class FakePublisher:
    """Publishes by rule, honouring keep_going like the real one.

    Ids in `reject` are rejected (a permanent error), ids in `fail` failed (the broker refused
    them this time); everything from id `fail_at` on is unsent (broker down)."""

    def __init__(
        self,
        reject: Mapping[int, str] | None = None,
        fail_at: int | None = None,
        fail: Mapping[int, str] | None = None,
        broker_error: str = "OperationalError: connection refused",
    ) -> None:
        self.reject = dict(reject or {})
        self.fail = dict(fail or {})
        self.fail_at = fail_at
        self.broker_error = broker_error
        self.published: list[list[int]] = []
        self.after_row: Callable[[int], None] = lambda row_id: None

    def publish(
        self, rows: Sequence[ClaimedRow], keep_going: Callable[[], bool] = lambda: True
    ) -> PublishResult:
        self.published.append([r.id for r in rows])
        result = PublishResult()
        for position, row in enumerate(rows):
            if not keep_going():
                result.unsent.extend(r.id for r in rows[position:])
                break
            if self.fail_at is not None and row.id >= self.fail_at:
                result.unsent.extend(r.id for r in rows[position:])
                result.broker_error = self.broker_error
                break
            if row.id in self.reject:
                result.rejected[row.id] = self.reject[row.id]
            elif row.id in self.fail:
                result.failed[row.id] = self.fail[row.id]
            else:
                result.accepted.append(row.id)
            self.after_row(row.id)
        return result


class RecordingHooks:
    def __init__(self) -> None:
        self.outcomes: list[BatchOutcome] = []
        self.database_errors = 0
        self.backpressure_changes: list[bool] = []
        self.loops: list[Settings] = []
        self.claims: list[tuple[int, int]] = []  # (rows, reclaimed)

    def loop(self, settings: Settings, shards: int) -> None:
        assert shards >= 0
        self.loops.append(settings)

    def claimed(self, rows: int, reclaimed: int, seconds: float) -> None:
        assert seconds >= 0
        self.claims.append((rows, reclaimed))

    def batch_done(self, outcome: BatchOutcome) -> None:
        self.outcomes.append(outcome)

    def database_error(self) -> None:
        self.database_errors += 1

    def backpressure(self, paused: bool) -> None:
        self.backpressure_changes.append(paused)


class RecordingStop(StopSignal):
    """A stop signal whose waits return at once and are recorded, so run() is synchronous."""

    def __init__(self, grace: float = math.inf, log: list[Any] | None = None) -> None:
        super().__init__(grace)
        self.waits: list[float | None] = []
        self.log = log if log is not None else []

    def wait(self, seconds: float | None = None) -> bool:
        self.waits.append(seconds)
        self.log.append(("wait", seconds))
        return self.is_set()


class ScriptedProbe:
    """Queue depths in order; once the script runs out, the last one repeats."""

    def __init__(self, depths: Iterable[int | None]) -> None:
        self.depths = list(depths)
        self.calls = 0

    def depth(self) -> int | None:
        self.calls += 1
        return self.depths.pop(0) if len(self.depths) > 1 else self.depths[0]


class FakeClock:
    """Stands in for the `time` module inside pool.poller: sleeping only moves the clock."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def perf_counter(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class UpperBoundRng(random.Random):
    """Jitter always at its maximum, so delays are exactly the capped exponential."""

    def uniform(self, a: float, b: float) -> float:
        return b


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(pool.poller, "time", fake)
    return fake


def make_poller(
    store: FakeStore,
    publisher: FakePublisher | None = None,
    stop: StopSignal | None = None,
    hooks: RecordingHooks | None = None,
    probe: ScriptedProbe | None = None,
    rng: random.Random | None = None,
    shards: FixedShards | None = None,
    **settings: Any,
) -> Poller:
    return Poller(
        store,
        publisher or FakePublisher(),
        IDENTITY,
        make_settings(**settings),
        stop or RecordingStop(),
        hooks,
        probe,
        rng,
        shards,
    )


# --- run_once: claiming --------------------------------------------------------------


def test_empty_claim_returns_zero_and_settles_nothing() -> None:
    store, publisher, hooks = FakeStore([[]]), FakePublisher(), RecordingHooks()
    assert make_poller(store, publisher, hooks=hooks).run_once() == 0
    assert publisher.published == []
    assert store.acks == store.nacks == store.releases == []
    assert hooks.outcomes == []


def test_claim_uses_identity_batch_size_and_lease_seconds() -> None:
    store = FakeStore([[]])
    make_poller(store, batch_size=7, lease_seconds=42).run_once()
    assert store.claims == [
        {"owner": "host:123:0", "shard_count": 3, "shard": [1], "limit": 7, "lease_seconds": 42.0}
    ]


def test_claims_follow_the_shards_the_poller_holds_now() -> None:
    class Keeper(FixedShards):
        def __init__(self) -> None:
            super().__init__(64, [])
            self.turns = [[3, 7], [], [5]]
            self.left = False

        def shards(self) -> list[int]:
            self.held = self.turns.pop(0)
            return self.held

        def leave(self) -> None:
            self.left = True

    keeper = Keeper()
    store = FakeStore([make_rows(3), [], make_rows(5)])
    poller = make_poller(store, shards=keeper)
    for _ in range(3):
        poller.run_once()
    assert [(c["shard_count"], c["shard"]) for c in store.claims] == [(64, [3, 7]), (64, []), (64, [5])]
    poller.close()
    assert keeper.left  # a graceful stop hands the shards back


# --- run_once: settling --------------------------------------------------------------


def test_accepted_rows_are_acked_under_the_claims_lease() -> None:
    store, publisher = FakeStore([make_rows(1, 2, 3)]), FakePublisher()
    assert make_poller(store, publisher).run_once() == 3
    assert publisher.published == [[1, 2, 3]]
    (lease,) = store.leases
    assert store.acks == [(lease, [1, 2, 3])]
    assert store.acks[0][0] is lease
    assert store.nacks == store.releases == []


def test_rejected_rows_are_dead_at_once_with_their_error() -> None:
    # A permanent error (the row's own values): trying again cannot help, whatever max_attempts says.
    store = FakeStore([make_rows(1, 2, 3, attempts={3: 1})])
    publisher = FakePublisher(reject={2: "value is NULL", 3: "timestamp 'infinity' cannot be read"})
    make_poller(store, publisher, max_attempts=100).run_once()
    (lease,) = store.leases
    assert store.acks == [(lease, [1])]
    ((nack_lease, failures),) = store.nacks
    assert nack_lease is lease
    assert all(isinstance(f, Failure) for f in failures)
    assert [(f.id, f.error, f.dead) for f in failures] == [
        (2, "value is NULL", True), (3, "timestamp 'infinity' cannot be read", True)]
    assert store.releases == []


def test_failed_rows_are_nacked_for_a_retry_with_their_error() -> None:
    store = FakeStore([make_rows(1, 2, 3)])
    publisher = FakePublisher(fail={2: "ChannelError: refused"})
    make_poller(store, publisher).run_once()
    (lease,) = store.leases
    assert store.acks == [(lease, [1, 3])]
    ((nack_lease, failures),) = store.nacks
    assert nack_lease is lease
    (failure,) = failures
    assert (failure.id, failure.error, failure.dead) == (2, "ChannelError: refused", False)
    assert store.releases == []


def test_a_failed_row_dies_when_this_attempt_reaches_max_attempts() -> None:
    # Claimed attempts count earlier failures; this failure is attempt number attempts + 1.
    attempts = {1: 0, 2: MAX_ATTEMPTS - 2, 3: MAX_ATTEMPTS - 1, 4: MAX_ATTEMPTS + 4}
    store = FakeStore([make_rows(1, 2, 3, 4, attempts=attempts)])
    publisher = FakePublisher(fail={i: f"bad {i}" for i in attempts})
    make_poller(store, publisher).run_once()
    ((_lease, failures),) = store.nacks
    assert {f.id: f.dead for f in failures} == {1: False, 2: False, 3: True, 4: True}
    assert store.acks[0][1] == []


def test_max_attempts_1_makes_the_first_failure_fatal() -> None:
    store = FakeStore([make_rows(1)])
    make_poller(store, FakePublisher(fail={1: "bad"}), max_attempts=1).run_once()
    assert [f.dead for f in store.nacks[0][1]] == [True]


def test_retry_in_is_the_jittered_backoff_of_the_attempt_number() -> None:
    attempts = {1: 0, 2: 1, 3: 2, 4: 9}
    store = FakeStore([make_rows(1, 2, 3, 4, attempts=attempts)])
    publisher = FakePublisher(fail={i: "bad" for i in attempts})
    make_poller(store, publisher, rng=random.Random(7), max_attempts=100).run_once()
    ((_lease, failures),) = store.nacks
    for failure in failures:
        exponential = capped_exponential(attempts[failure.id] + 1)
        assert exponential / 2 <= failure.retry_in <= exponential, failure
    # 2, 4, 8 seconds, then capped at 10
    assert [capped_exponential(attempts[f.id] + 1) for f in failures] == [2.0, 4.0, 8.0, 10.0]


def test_retry_in_uses_the_configured_base_and_cap() -> None:
    attempts = {1: 0, 2: 1, 3: 5}
    store = FakeStore([make_rows(1, 2, 3, attempts=attempts)])
    publisher = FakePublisher(fail={i: "bad" for i in attempts})
    poller = make_poller(
        store, publisher, rng=UpperBoundRng(), retry_base_seconds=3, retry_cap_seconds=20, max_attempts=10
    )
    poller.run_once()
    assert {f.id: f.retry_in for f in store.nacks[0][1]} == {1: 3.0, 2: 6.0, 3: 20.0}


def test_unsent_rows_are_released_not_nacked() -> None:
    store = FakeStore([make_rows(1, 2, 3, 4)])
    make_poller(store, FakePublisher(fail_at=3)).run_once()
    (lease,) = store.leases
    assert store.acks == [(lease, [1, 2])]
    assert store.releases == [(lease, [3, 4])]
    assert store.nacks == []


def test_mixed_batch_settles_every_row_exactly_once_and_reports_the_outcome() -> None:
    store = FakeStore([make_rows(1, 2, 3, 4, 5, 6, attempts={5: MAX_ATTEMPTS - 1})])
    publisher = FakePublisher(reject={4: "bad"}, fail={3: "refused", 5: "refused"}, fail_at=6)
    hooks = RecordingHooks()
    assert make_poller(store, publisher, hooks=hooks).run_once() == 6
    (lease,) = store.leases
    assert store.acks == [(lease, [1, 2])]
    assert sorted((f.id, f.dead) for f in store.nacks[0][1]) == [(3, False), (4, True), (5, True)]
    assert store.releases == [(lease, [6])]
    settled = store.acks[0][1] + [f.id for f in store.nacks[0][1]] + store.releases[0][1]
    assert sorted(settled) == [1, 2, 3, 4, 5, 6]
    (outcome,) = hooks.outcomes
    assert (outcome.claimed, outcome.published, outcome.acked) == (6, 2, 2)
    assert (outcome.retried, outcome.dead, outcome.unsent) == (1, 2, 1)
    assert outcome.seconds >= outcome.publish_seconds + outcome.settle_seconds >= 0


def test_every_loop_reports_liveness_settings_and_the_claim() -> None:
    stop, hooks = RecordingStop(), RecordingHooks()
    store = FakeStore([make_rows(1, 2), []])
    store.on_claim = lambda n: stop.request() if n == 2 else None
    make_poller(store, stop=stop, hooks=hooks, batch_size=5).run()
    assert [s.batch_size for s in hooks.loops] == [5, 5]
    assert hooks.claims == [(2, 0), (0, 0)]  # empty claims are reported too (claim latency)


def test_a_poller_paused_by_backpressure_still_reports_that_it_is_alive(check_every_call: None) -> None:
    stop, hooks = RecordingStop(), RecordingHooks()
    store = FakeStore([make_rows(1)])
    store.on_claim = lambda n: stop.request()
    probe = ScriptedProbe([20, 20, 20, 1])
    make_poller(store, stop=stop, hooks=hooks, probe=probe, backpressure_high=10, backpressure_low=5).run()
    assert len(hooks.loops) == 4  # three paused turns and the one that claimed
    assert hooks.claims == [(1, 0)]


def test_a_paused_poller_keeps_its_membership_and_shard_leases(check_every_call: None) -> None:
    # Membership heartbeats and shard-lease renewals happen in shards(): a paused poller that
    # skipped it looked gone in status, and its shards' leases lapsed.
    class Keeper(FixedShards):
        def __init__(self) -> None:
            super().__init__(64, [1, 2])
            self.asked = 0

        def shards(self) -> list[int]:
            self.asked += 1
            return self.held

    keeper, stop = Keeper(), RecordingStop()
    store = FakeStore([make_rows(1)])
    store.on_claim = lambda n: stop.request()
    probe = ScriptedProbe([20, 20, 20, 1])
    make_poller(store, stop=stop, shards=keeper, probe=probe, backpressure_high=10, backpressure_low=5).run()
    assert keeper.asked == 4  # three paused turns and the one that claimed


def test_each_batch_is_settled_under_its_own_lease() -> None:
    store = FakeStore([make_rows(1, 2), make_rows(3)])
    poller = make_poller(store)
    poller.run_once()
    poller.run_once()
    first, second = store.leases
    assert first != second
    assert store.acks == [(first, [1, 2]), (second, [3])]


def test_lost_lease_is_counted_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    store, hooks = FakeStore([make_rows(1, 2, 3)], lost=1), RecordingHooks()
    with caplog.at_level(logging.WARNING, logger="pool.poller"):
        make_poller(store, hooks=hooks).run_once()
    (outcome,) = hooks.outcomes
    assert (outcome.published, outcome.acked) == (3, 2)
    assert any("lease lost on 1 of 3" in r.getMessage() for r in caplog.records)


def test_dead_rows_are_logged_with_their_error(caplog: pytest.LogCaptureFixture) -> None:
    store = FakeStore([make_rows(1, 2, attempts={1: MAX_ATTEMPTS - 1})])
    with caplog.at_level(logging.WARNING, logger="pool.poller"):
        make_poller(store, FakePublisher(fail={1: "refused"}, reject={2: "name is NULL"})).run_once()
    assert f"row 1 is dead after {MAX_ATTEMPTS} attempt(s): refused" in caplog.messages
    assert "row 2 is dead after 1 attempt(s) (a permanent error): name is NULL" in caplog.messages


def test_broker_outage_is_logged_once_and_recovery_once(caplog: pytest.LogCaptureFixture) -> None:
    store = FakeStore([make_rows(1), make_rows(2), make_rows(3)])
    publisher = FakePublisher(fail_at=1)
    poller = make_poller(store, publisher)
    with caplog.at_level(logging.INFO, logger="pool.poller"):
        poller.run_once()
        poller.run_once()
        publisher.fail_at = None
        poller.run_once()
    assert sum("broker unavailable" in m for m in caplog.messages) == 1
    assert sum("broker reachable again" in m for m in caplog.messages) == 1


def test_database_error_from_claim_propagates_from_run_once() -> None:
    with pytest.raises(OperationalError):
        make_poller(FakeStore([db_error()])).run_once()


# --- graceful shutdown: keep_going ----------------------------------------------------


def test_once_the_grace_is_spent_the_rest_of_the_batch_is_released() -> None:
    stop = RecordingStop(grace=0)
    store, publisher, hooks = FakeStore([make_rows(1, 2, 3, 4)]), FakePublisher(), RecordingHooks()
    publisher.after_row = lambda row_id: stop.request() if row_id == 2 else None
    make_poller(store, publisher, stop=stop, hooks=hooks).run_once()
    assert store.acked_ids() == [[1, 2]]
    assert store.released_ids() == [[3, 4]]
    assert store.nacks == []  # a shutdown charges no attempt
    assert (hooks.outcomes[0].published, hooks.outcomes[0].unsent) == (2, 2)


def test_within_the_grace_the_in_flight_batch_is_finished() -> None:
    stop = RecordingStop(grace=3600)
    store, publisher = FakeStore([make_rows(1, 2, 3, 4)]), FakePublisher()
    publisher.after_row = lambda row_id: stop.request() if row_id == 1 else None
    make_poller(store, publisher, stop=stop).run_once()
    assert store.acked_ids() == [[1, 2, 3, 4]]
    assert store.releases == []


def test_keep_going_turns_false_only_after_stop_and_grace() -> None:
    stop = RecordingStop(grace=0)
    seen: list[bool] = []

    class Spy(FakePublisher):
        def publish(self, rows: Sequence[ClaimedRow], keep_going: Callable[[], bool] = lambda: True):
            seen.append(keep_going())
            stop.request()
            seen.append(keep_going())
            return super().publish(rows, keep_going)

    store = FakeStore([make_rows(1, 2)])
    make_poller(store, Spy(), stop=stop).run_once()
    assert seen == [True, False]
    assert store.released_ids() == [[1, 2]]


# --- settling through database errors (_until_done) ----------------------------------


@pytest.mark.parametrize("method", ["ack", "nack", "release"])
def test_a_settling_write_is_retried_through_a_database_error(clock: FakeClock, method: str) -> None:
    store, hooks = FakeStore([make_rows(1, 2, 3)]), RecordingHooks()
    store.errors[method] = [OperationalError("x", {}, Exception("down"))]
    publisher = FakePublisher(reject={2: "bad"}, fail_at=3)
    make_poller(store, publisher, hooks=hooks).run_once()
    assert store.calls[method] == 2
    assert clock.sleeps == [BACKOFF_START]
    assert hooks.database_errors == 1
    # and the batch is fully settled after all
    assert store.acked_ids() == [[1]]
    assert [f.id for _lease, failures in store.nacks for f in failures] == [2]
    assert store.released_ids() == [[3]]
    assert hooks.outcomes[0].acked == 1


def test_settling_retries_back_off_exponentially_up_to_the_cap(clock: FakeClock) -> None:
    store, hooks = FakeStore([make_rows(1)]), RecordingHooks()
    store.errors["ack"] = [db_error() for _ in range(6)]
    make_poller(store, hooks=hooks, lease_seconds=600).run_once()
    assert clock.sleeps == [min(BACKOFF_START * 2**i, BACKOFF_CAP) for i in range(6)]
    assert store.acked_ids() == [[1]]
    assert hooks.database_errors == 6


def test_until_done_raises_once_the_lease_has_run_out(clock: FakeClock) -> None:
    hooks = RecordingHooks()
    poller = make_poller(FakeStore(), hooks=hooks)
    poller.heartbeat.valid_until = clock.now - 1
    calls = []

    def failing() -> int:
        calls.append(1)
        if len(calls) > 3:
            pytest.fail("the write was retried after the lease ran out")
        raise OperationalError("x", {}, Exception("down"))

    with pytest.raises(OperationalError):
        poller._until_done(failing)
    assert calls == [1]  # no retry: the rows may already belong to another poller
    assert clock.sleeps == []


def test_until_done_returns_the_result_of_the_write(clock: FakeClock) -> None:
    poller = make_poller(FakeStore())
    poller.heartbeat.valid_until = clock.now + 60
    results = iter([db_error(), 7])

    def flaky() -> int:
        outcome = next(results)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    assert poller._until_done(flaky) == 7


def test_ack_gives_up_when_the_next_retry_would_outlive_the_lease(clock: FakeClock) -> None:
    # lease 3 s: retry after 0.5 s (t=0.5), after 1 s (t=1.5); waiting 2 s more would pass t=3.
    store = FakeStore([make_rows(1, 2)])
    store.errors["ack"] = [db_error() for _ in range(10)]
    hooks = RecordingHooks()
    with pytest.raises(OperationalError):
        make_poller(store, hooks=hooks, lease_seconds=3).run_once()
    assert clock.sleeps == [0.5, 1.0]
    assert store.calls["ack"] == 3
    assert hooks.outcomes == []


def test_an_ack_given_up_in_an_outage_is_made_first_once_the_database_answers(clock: FakeClock) -> None:
    # Lease 3 s: the ack gives up after three tries. Rows 1 and 2 are on the broker and stay
    # leased to this poller until another claims them, which needs the database back as well.
    # Released, or their ack dropped, they would be published a second time.
    store = FakeStore([make_rows(1, 2, 3), make_rows(4)])
    store.errors["ack"] = [db_error() for _ in range(4)]  # three tries, then once more later
    acks_at_claim: list[int] = []
    store.on_claim = lambda n: acks_at_claim.append(len(store.acks))
    publisher = FakePublisher(fail_at=3)
    poller = make_poller(store, publisher, lease_seconds=3, batch_size=3)
    with pytest.raises(OperationalError):
        poller.run_once()
    publisher.fail_at = None
    first = store.leases[0]
    assert store.releases == [(first, [3])]  # the unsent row only
    with pytest.raises(OperationalError):
        poller.run_once()  # still down: the ack is kept, nothing is claimed
    assert len(store.claims) == 1
    assert poller.run_once() == 1  # back: the ack goes first, under the batch's own lease
    assert store.acks == [(first, [1, 2]), (store.leases[1], [4])]
    assert acks_at_claim == [0, 1]


# --- backpressure --------------------------------------------------------------------


@pytest.fixture
def check_every_call(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pool.poller, "DEPTH_CHECK_INTERVAL", 0)


def test_backpressure_pauses_above_high_and_resumes_below_low(check_every_call: None) -> None:
    depths = [3, 10, 11, 15, 7, 10, 5, 4, 12, 2]
    expected = [False, False, True, True, True, True, True, False, True, False]
    probe, hooks = ScriptedProbe(depths), RecordingHooks()
    poller = make_poller(FakeStore(), hooks=hooks, probe=probe, backpressure_high=10, backpressure_low=5)
    assert [poller._must_pause() for _ in depths] == expected
    assert probe.calls == len(depths)
    # one report per state change, not per check
    assert hooks.backpressure_changes == [True, False, True, False]


@pytest.mark.parametrize("paused_before", [False, True])
def test_unknown_depth_keeps_the_current_state(check_every_call: None, paused_before: bool) -> None:
    first = 20 if paused_before else 0
    probe, hooks = ScriptedProbe([first, None, None]), RecordingHooks()
    poller = make_poller(FakeStore(), hooks=hooks, probe=probe, backpressure_high=10, backpressure_low=5)
    assert [poller._must_pause() for _ in range(3)] == [paused_before] * 3
    assert hooks.backpressure_changes == ([True] if paused_before else [])


def test_backpressure_high_0_turns_it_off(check_every_call: None) -> None:
    probe, hooks = ScriptedProbe([10**9]), RecordingHooks()
    poller = make_poller(FakeStore(), hooks=hooks, probe=probe, backpressure_high=0, backpressure_low=5)
    assert [poller._must_pause() for _ in range(3)] == [False] * 3
    assert probe.calls == 0  # the broker is not even asked
    assert hooks.backpressure_changes == []


def test_without_a_probe_there_is_no_backpressure() -> None:
    poller = make_poller(FakeStore(), backpressure_high=10, backpressure_low=5)
    assert poller._must_pause() is False


def test_a_paused_poller_rechecks_the_queue_promptly_whatever_the_poll_interval() -> None:
    stop, hooks = RecordingStop(), RecordingHooks()
    store = FakeStore([make_rows(1)])
    store.on_claim = lambda n: stop.request()
    probe = ScriptedProbe([20, 20, 0])
    poller = make_poller(
        store, stop=stop, hooks=hooks, probe=probe, backpressure_high=10, backpressure_low=5, poll_interval=60
    )
    poller.run()
    assert probe.calls == 3  # asked before every claim attempt
    assert stop.waits[:2] == [DEPTH_CHECK_INTERVAL, DEPTH_CHECK_INTERVAL]
    assert DEPTH_CHECK_INTERVAL <= 1
    assert store.acked_ids() == [[1]]


# --- run -----------------------------------------------------------------------------


def test_run_returns_at_once_when_already_stopped() -> None:
    store, stop = FakeStore([make_rows(1)]), RecordingStop()
    stop.request()
    make_poller(store, stop=stop).run()
    assert store.claims == []


def test_run_stops_when_stop_is_requested_and_finishes_the_batch_in_flight() -> None:
    stop = RecordingStop()
    store = FakeStore([make_rows(1), [], make_rows(2)])
    store.on_claim = lambda n: stop.request() if n == 3 else None
    make_poller(store, stop=stop).run()
    assert len(store.claims) == 3
    assert store.acked_ids() == [[1], [2]]


def test_run_with_a_real_stop_signal_returns_without_sleeping() -> None:
    stop = StopSignal()
    store, publisher = FakeStore([make_rows(1, 2)]), FakePublisher()
    publisher.after_row = lambda row_id: stop.request()
    started = time.monotonic()
    make_poller(store, publisher, stop=stop, poll_interval=3600).run()
    assert time.monotonic() - started < 5
    assert store.acked_ids() == [[1, 2]]
    assert len(store.claims) == 1


def test_full_batches_are_claimed_back_to_back_then_it_rests() -> None:
    log: list[Any] = []
    stop = RecordingStop(log=log)
    store = FakeStore([make_rows(1, 2), make_rows(3, 4), make_rows(5), []])

    def on_claim(n: int) -> None:
        log.append("claim")
        if n == 4:
            stop.request()

    store.on_claim = on_claim
    make_poller(store, stop=stop, rng=UpperBoundRng(), batch_size=2, poll_interval=0.2,
                busy_poll_interval=0.05).run()
    # No wait after the two full batches; the busy interval after the short one, twice that
    # after the empty one.
    assert log == ["claim", "claim", "claim", ("wait", 0.05), "claim", ("wait", 0.1)]


def test_empty_claims_double_the_rest_up_to_the_poll_interval_and_rows_reset_it() -> None:
    stop = RecordingStop()
    store = FakeStore([[], [], [], [], [], make_rows(1), [], make_rows(2, 3, 4, 5, 6), []])
    store.on_claim = lambda n: stop.request() if n == 9 else None
    make_poller(store, stop=stop, rng=UpperBoundRng(), batch_size=5, poll_interval=1.0,
                busy_poll_interval=0.1).run()
    assert stop.waits == [0.1, 0.2, 0.4, 0.8, 1.0, 0.1, 0.2, 0.1]


class FakeWake:
    """A NOTIFY listener whose waits end at once: woken (True) or on the timer (False), as scripted."""

    def __init__(self, woken: bool = False) -> None:
        self.woken = woken
        self.waits: list[float] = []
        self.peer_wakes: list[int] = []  # the claim count at each wake_peers()
        self.claims = 0

    def listen(self) -> None:
        pass

    def wait(self, seconds: float, stop: Callable[[], bool]) -> bool:
        self.waits.append(seconds)
        return self.woken

    def wake_peers(self) -> None:
        self.peer_wakes.append(self.claims)

    def close(self) -> None:
        pass


class ListeningStore(FakeStore):
    """A FakeStore with a NOTIFY listener, like PostgreSQL."""

    def __init__(self, batches: Iterable[list[ClaimedRow] | Exception], wake: FakeWake) -> None:
        super().__init__(batches)
        self.wake = wake

    def wake_listener(self) -> FakeWake:
        return self.wake

    def claim(self, *args: Any, **kwargs: Any) -> Claim:
        self.wake.claims += 1
        return super().claim(*args, **kwargs)


def run_until_claims_run_out(store: FakeStore, rng: random.Random | None = None, **settings: Any) -> None:
    """Run the poller over the store's scripted claims; idle rests unjittered unless `rng` says."""
    stop = RecordingStop()
    claims = len(store.batches)
    store.on_claim = lambda n: stop.request() if n == claims else None
    make_poller(store, stop=stop, rng=rng or UpperBoundRng(), **settings).run()


def test_rows_after_an_idle_spell_wake_the_other_pollers_once() -> None:
    wake = FakeWake()
    # Idle until the rest reaches the poll interval; then rows arrive and keep arriving.
    store = ListeningStore([[], [], [], make_rows(1), make_rows(2), [], make_rows(3), make_rows(4)], wake)
    run_until_claims_run_out(store, batch_size=5, poll_interval=0.4, busy_poll_interval=0.1)
    assert wake.waits[:3] == [0.1, 0.2, 0.4]
    # Only the claim that ended the idle spell wakes the others: after a short gap in a steady
    # load (claim 6) the rest stays below four busy intervals.
    assert wake.peer_wakes == [4]


def test_with_the_default_intervals_rows_after_three_empty_claims_wake_the_others() -> None:
    wake = FakeWake()
    # Rests of 0.05 and 0.1 s are gaps in a load; after 0.2 s (four busy intervals) it is a spell.
    store = ListeningStore([make_rows(1), [], make_rows(2), [], [], make_rows(3)], wake)
    run_until_claims_run_out(store, batch_size=5, poll_interval=1.0, busy_poll_interval=0.05)
    assert wake.waits[:5] == [0.05, 0.1, 0.05, 0.1, 0.2]
    assert wake.peer_wakes == [6]


def test_a_poller_woken_by_a_notify_wakes_nobody_and_stays_at_the_busy_interval() -> None:
    wake = FakeWake(woken=True)
    store = ListeningStore([[], [], [], make_rows(1), []], wake)
    run_until_claims_run_out(store, batch_size=5, poll_interval=0.4, busy_poll_interval=0.1)
    # Each rest ends in a NOTIFY: rows are arriving, if not on this poller's shards yet.
    assert wake.waits == [0.1, 0.1, 0.1, 0.1, 0.1]
    assert wake.peer_wakes == []


class LowerBoundRng(random.Random):
    """Jitter always at its minimum."""

    def uniform(self, a: float, b: float) -> float:
        return a


def test_idle_rests_are_jittered_down_to_half_and_rests_under_load_are_exact() -> None:
    wake = FakeWake()
    store = ListeningStore([[], [], make_rows(1), []], wake)
    run_until_claims_run_out(store, rng=LowerBoundRng(), batch_size=5, poll_interval=1.0,
                             busy_poll_interval=0.1)
    # The doubling goes on from the nominal rest (0.1, 0.2), not from the jittered one.
    assert wake.waits == [0.05, 0.1, 0.1, 0.1]


def test_a_busy_interval_above_the_poll_interval_is_held_to_it() -> None:
    stop = RecordingStop()
    store = FakeStore([make_rows(1), []])
    store.on_claim = lambda n: stop.request() if n == 2 else None
    make_poller(store, stop=stop, rng=UpperBoundRng(), batch_size=5, poll_interval=0.2,
                busy_poll_interval=5).run()
    assert stop.waits == [0.2, 0.2]


def test_database_error_from_claim_is_survived(caplog: pytest.LogCaptureFixture) -> None:
    stop, hooks = RecordingStop(), RecordingHooks()
    store = FakeStore([db_error(), make_rows(1)])
    store.on_claim = lambda n: stop.request() if n == 2 else None
    with caplog.at_level(logging.INFO, logger="pool.poller"):
        make_poller(store, stop=stop, hooks=hooks).run()
    assert hooks.database_errors == 1
    assert stop.waits[0] == BACKOFF_START
    assert store.acked_ids() == [[1]]
    assert sum("database unavailable" in m for m in caplog.messages) == 1
    assert sum("database reachable again" in m for m in caplog.messages) == 1
    assert not any("noise" in m for m in caplog.messages)  # only the driver error's first line


def test_database_errors_back_off_exponentially_up_to_the_cap(caplog: pytest.LogCaptureFixture) -> None:
    stop, hooks = RecordingStop(), RecordingHooks()
    failures = 10
    store = FakeStore([db_error() for _ in range(failures)] + [make_rows(1)])
    store.on_claim = lambda n: stop.request() if n == failures + 1 else None
    with caplog.at_level(logging.INFO, logger="pool.poller"):
        make_poller(store, stop=stop, hooks=hooks).run()
    assert hooks.database_errors == failures
    assert stop.waits[:failures] == [min(BACKOFF_START * 2**i, BACKOFF_CAP) for i in range(failures)]
    assert store.acked_ids() == [[1]]  # recovered and carried on
    assert sum("database unavailable" in m for m in caplog.messages) == 1  # once per outage


def test_database_backoff_resets_after_success() -> None:
    stop = RecordingStop()
    store = FakeStore([db_error(), db_error(), make_rows(1), db_error(), []])
    store.on_claim = lambda n: stop.request() if n == 5 else None
    make_poller(store, stop=stop, rng=UpperBoundRng(), batch_size=5, poll_interval=0.2,
                busy_poll_interval=0.05).run()
    assert stop.waits == [BACKOFF_START, BACKOFF_START * 2, 0.05, BACKOFF_START, 0.1]


def test_stop_during_database_backoff_ends_the_loop() -> None:
    stop = RecordingStop()
    store = FakeStore([db_error()])
    store.on_claim = lambda n: stop.request()
    make_poller(store, stop=stop).run()
    assert len(store.claims) == 1
    assert stop.waits == [BACKOFF_START]


def test_broker_outage_backs_off_and_releases_rows() -> None:
    stop = RecordingStop()
    store = FakeStore([make_rows(1, 2) for _ in range(4)])
    publisher = FakePublisher(fail_at=1)

    def on_claim(n: int) -> None:
        if n == 3:
            publisher.fail_at = None  # the broker is back
        if n == 4:
            stop.request()

    store.on_claim = on_claim
    make_poller(store, publisher, stop=stop, batch_size=2).run()
    # Two failing batches: broker backoff 0.5 then 1.0; then full batches go back to back.
    assert stop.waits == [BACKOFF_START, BACKOFF_START * 2]
    assert store.released_ids() == [[1, 2], [1, 2]]
    assert store.acked_ids() == [[1, 2], [1, 2]]
    assert store.nacks == []  # a broker outage charges the rows no attempt


def test_run_claims_nothing_while_paused_by_backpressure(check_every_call: None) -> None:
    log: list[Any] = []
    stop, hooks = RecordingStop(log=log), RecordingHooks()
    store = FakeStore([make_rows(1)])

    def on_claim(n: int) -> None:
        log.append("claim")
        stop.request()

    store.on_claim = on_claim
    probe = ScriptedProbe([20, 8, 1])
    poller = make_poller(
        store,
        stop=stop,
        hooks=hooks,
        probe=probe,
        backpressure_high=10,
        backpressure_low=5,
        poll_interval=0.2,
        busy_poll_interval=0.05,
    )
    poller.run()
    # paused at 20, still paused at 8 (not below low), claims again at 1
    assert log == [("wait", 0), ("wait", 0), "claim", ("wait", 0.05)]
    assert hooks.backpressure_changes == [True, False]
    assert store.acked_ids() == [[1]]


# --- LeaseHeartbeat ------------------------------------------------------------------


class SignallingStore(FakeStore):
    """Sets `extended` on the first successful extend, noting the heartbeat's horizon before it."""

    def __init__(self, fail_first: int = 0) -> None:
        super().__init__()
        self.extended = threading.Event()
        self.fail_first = fail_first
        self.heartbeat: LeaseHeartbeat | None = None
        self.horizon_before: float | None = None

    def extend_lease(self, lease: Lease, lease_seconds: float) -> int:
        if self.fail_first:
            self.fail_first -= 1
            raise db_error()
        if not self.extended.is_set() and self.heartbeat is not None:
            self.horizon_before = self.heartbeat.valid_until
        super().extend_lease(lease, lease_seconds)
        self.extended.set()
        return 1


def heartbeat_threads(besides: set[threading.Thread] | frozenset = frozenset()) -> set[threading.Thread]:
    """Live heartbeat threads, other than `besides` (those of pollers other tests left open)."""
    return {t for t in threading.enumerate() if t.name == "lease-heartbeat"} - besides


def test_heartbeat_extends_the_same_lease_while_a_batch_is_held() -> None:
    others = heartbeat_threads()
    store, lease = SignallingStore(), Lease(owner="me", token=99)
    heartbeat = LeaseHeartbeat(store, 0.03)
    store.heartbeat = heartbeat
    with heartbeat.holding(lease):
        assert store.extended.wait(10), "the lease was never extended"
    assert store.extends[0] == (lease, 0.03)
    assert all(extended_lease is lease for extended_lease, _s in store.extends)
    # A successful extension moves the horizon that settling retries rely on.
    assert store.horizon_before is not None
    assert heartbeat.valid_until > store.horizon_before
    heartbeat.close()
    assert heartbeat_threads(others) == set()  # the heartbeat thread stops with close()


def test_one_heartbeat_thread_serves_every_batch_and_rests_between_them() -> None:
    others = heartbeat_threads()
    store = SignallingStore()
    heartbeat = LeaseHeartbeat(store, 0.03)
    first, second = Lease(owner="me", token=1), Lease(owner="me", token=2)
    try:
        with heartbeat.holding(first):
            assert store.extended.wait(10)
        beats_after_first = len(store.extends)
        store.extended.clear()
        assert len(heartbeat_threads(others)) == 1
        with heartbeat.holding(second):
            assert store.extended.wait(10), "the second batch's lease was never extended"
        assert len(heartbeat_threads(others)) == 1
        settled = len(store.extends)
        # Between batches nothing is extended: two beat intervals pass without a call.
        time.sleep(0.03)  # an absence of beats can only be observed over time
        assert len(store.extends) == settled
        assert {lease for lease, _s in store.extends[:beats_after_first]} == {first}
        assert {lease for lease, _s in store.extends[beats_after_first:]} == {second}
    finally:
        heartbeat.close()
    assert heartbeat_threads(others) == set()


def test_heartbeat_keeps_beating_after_a_database_error() -> None:
    others = heartbeat_threads()
    store = SignallingStore(fail_first=1)
    heartbeat = LeaseHeartbeat(store, 0.03)
    with heartbeat.holding(Lease(owner="me", token=1)):
        assert store.extended.wait(10), "the heartbeat gave up after one failed extension"
    heartbeat.close()
    assert heartbeat_threads(others) == set()


class BeatRecordingStore(FakeStore):
    """Notes the clock at each extension; each takes `round_trip` seconds of that clock."""

    def __init__(self, clock: SteppedClock, round_trip: float = 0.0) -> None:
        super().__init__()
        self.clock = clock
        self.round_trip = round_trip
        self.beats: list[float] = []
        self.beaten = threading.Condition()

    def extend_lease(self, lease: Lease, lease_seconds: float) -> int:
        with self.beaten:
            self.beats.append(self.clock.now)
            self.clock.now += self.round_trip
            self.beaten.notify_all()
        return 1

    def wait_for_beats(self, count: int) -> list[float]:
        with self.beaten:
            self.beaten.wait_for(lambda: len(self.beats) >= count, timeout=5)
            return list(self.beats)


def test_heartbeat_beats_a_third_of_a_lease_after_the_claim_and_every_third_after() -> None:
    # A beat only at the lease's end would come too late: any delay, and the rows are another's.
    clock = SteppedClock(100.0)
    store = BeatRecordingStore(clock)
    heartbeat = LeaseHeartbeat(store, 30.0, clock=clock)
    try:
        with heartbeat.holding(Lease(owner="me", token=1)):
            move_clock(heartbeat, clock, 109.9)
            move_clock(heartbeat, clock, 110.0)
            assert store.wait_for_beats(1) == [110.0], "no beat a third of the lease after the claim"
            move_clock(heartbeat, clock, 119.9)
            move_clock(heartbeat, clock, 120.0)
            assert store.wait_for_beats(2) == [110.0, 120.0], "no beat a third of the lease after the last"
    finally:
        heartbeat.close()


def test_heartbeat_counts_an_extended_lease_from_when_the_beat_began() -> None:
    # The database set the new expiry at some moment of the round trip: the lease surely holds
    # only a lease from its start. Counted from its end, a slow round trip would let settling
    # retries go on writing after the rows could be another poller's.
    clock = SteppedClock(100.0)
    store = BeatRecordingStore(clock, round_trip=2.5)
    heartbeat = LeaseHeartbeat(store, 30.0, clock=clock)
    try:
        with heartbeat.holding(Lease(owner="me", token=1)):
            assert heartbeat.valid_until == 130.0
            move_clock(heartbeat, clock, 110.0)
            assert store.wait_for_beats(1) == [110.0]
            deadline = time.monotonic() + 5
            while heartbeat.valid_until == 130.0 and time.monotonic() < deadline:
                time.sleep(0.001)  # the beat thread sets it right after the round trip
            assert heartbeat.valid_until == 140.0
    finally:
        heartbeat.close()


# --- StopSignal ----------------------------------------------------------------------


def test_stop_signal_starts_unset() -> None:
    stop = StopSignal(grace=0)
    assert not stop.is_set()
    assert not stop.out_of_time()
    assert stop.wait(0) is False


def test_request_with_zero_grace_is_out_of_time_at_once() -> None:
    stop = StopSignal(grace=0)
    stop.request()
    assert stop.is_set()
    assert stop.wait(0) is True
    assert stop.out_of_time()


def test_request_with_grace_left_is_not_out_of_time() -> None:
    stop = StopSignal(grace=3600)
    stop.request()
    assert stop.is_set()
    assert not stop.out_of_time()


def test_default_grace_never_runs_out() -> None:
    stop = StopSignal()
    stop.request()
    assert not stop.out_of_time()


def test_a_second_request_keeps_the_first_deadline() -> None:
    stop = StopSignal(grace=3600)
    stop.request()
    deadline = stop.deadline
    stop.grace = 0  # were the deadline reset, it would now be in the past
    stop.request()
    assert stop.deadline == deadline
    assert not stop.out_of_time()


def test_out_of_time_follows_the_clock(clock: FakeClock) -> None:
    stop = StopSignal(grace=10)
    stop.request()
    assert stop.deadline == clock.now + 10
    clock.now += 9.9
    assert not stop.out_of_time()
    clock.now += 0.1
    assert stop.out_of_time()


# --- structured log fields (extra={"fields": ...}) ------------------------------------


def fields_of(caplog: pytest.LogCaptureFixture, needle: str) -> list[dict[str, Any]]:
    return [r.fields for r in caplog.records if needle in r.getMessage()]


def test_each_batch_logs_its_counts_as_fields_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    store = FakeStore([make_rows(1, 2, 3, attempts={3: MAX_ATTEMPTS - 1})])
    with caplog.at_level(logging.DEBUG, logger="pool.poller"):
        make_poller(store, FakePublisher(fail={2: "bad", 3: "worse"})).run_once()
    (record,) = [r for r in caplog.records if r.getMessage() == "batch done"]
    assert record.levelno == logging.DEBUG
    assert {k: v for k, v in record.fields.items() if k != "seconds"} == {
        "claimed": 3, "reclaimed": 0, "published": 1, "acked": 1, "retried": 1, "dead": 1, "unsent": 0,
    }
    assert isinstance(record.fields["seconds"], float)


def test_no_batch_line_above_debug(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="pool.poller"):
        make_poller(FakeStore([make_rows(1, 2)])).run_once()
    assert not caplog.records


def test_a_dead_row_line_carries_its_id_attempts_and_error(caplog: pytest.LogCaptureFixture) -> None:
    store = FakeStore([make_rows(1, 2, attempts={1: MAX_ATTEMPTS - 1})])
    with caplog.at_level(logging.WARNING, logger="pool.poller"):
        make_poller(store, FakePublisher(fail={1: "refused"}, reject={2: "name is NULL"})).run_once()
    assert fields_of(caplog, "row 1 is dead") == [
        {"event": "row_dead", "row_id": 1, "attempts": MAX_ATTEMPTS, "permanent": False, "error": "refused"}
    ]
    assert fields_of(caplog, "row 2 is dead") == [
        {"event": "row_dead", "row_id": 2, "attempts": 1, "permanent": True, "error": "name is NULL"}
    ]
    assert all(r.levelno == logging.WARNING for r in caplog.records)


def test_a_lost_lease_line_carries_its_counts(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="pool.poller"):
        make_poller(FakeStore([make_rows(1, 2, 3)], lost=1)).run_once()
    assert fields_of(caplog, "lease lost") == [{"event": "lease_lost", "lost": 1, "published": 3}]


def test_broker_outage_lines_carry_the_error_and_how_long_it_lasted(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    store = FakeStore([make_rows(1), make_rows(2), make_rows(3)])
    publisher = FakePublisher(fail_at=1, broker_error="ConnectionError: refused")
    poller = make_poller(store, publisher)
    with caplog.at_level(logging.INFO, logger="pool.poller"):
        poller.run_once()
        clock.now += 4.0
        poller.run_once()
        clock.now += 3.5
        publisher.fail_at = None
        poller.run_once()
    assert fields_of(caplog, "broker unavailable") == [
        {"event": "broker_unavailable", "error": "ConnectionError: refused"}
    ]
    assert fields_of(caplog, "broker reachable again") == [{"event": "broker_reachable", "down_seconds": 7.5}]


def test_database_outage_lines_carry_the_error_and_how_long_it_lasted(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    stop = RecordingStop()
    store = FakeStore([db_error(), db_error(), make_rows(1)])

    def on_claim(n: int) -> None:
        clock.now += 2.0
        if n == 3:
            stop.request()

    store.on_claim = on_claim
    with caplog.at_level(logging.INFO, logger="pool.poller"):
        make_poller(store, stop=stop).run()
    (unavailable,) = fields_of(caplog, "database unavailable")
    assert unavailable["event"] == "database_unavailable"
    assert "could not connect to server" in unavailable["error"] and "noise" not in unavailable["error"]
    assert fields_of(caplog, "database reachable again") == [
        {"event": "database_reachable", "down_seconds": 4.0}
    ]


def test_backpressure_lines_carry_queue_depth_and_mark(
    check_every_call: None, caplog: pytest.LogCaptureFixture
) -> None:
    probe = ScriptedProbe([11, 4])
    poller = make_poller(FakeStore(), probe=probe, backpressure_high=10, backpressure_low=5, queue="q1")
    with caplog.at_level(logging.INFO, logger="pool.poller"):
        poller._must_pause()
        poller._must_pause()
    assert fields_of(caplog, "pausing claims") == [
        {"event": "backpressure_paused", "queue": "q1", "depth": 11, "high": 10}
    ]
    assert fields_of(caplog, "backpressure released") == [
        {"event": "backpressure_released", "queue": "q1", "depth": 4, "low": 5}
    ]
