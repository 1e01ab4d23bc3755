"""The claim -> publish -> ack/nack loop of one poller. No SQL and no prometheus here."""

from __future__ import annotations

import contextlib
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from sqlalchemy.exc import DBAPIError

from pool.backoff import retry_delay
from pool.config import Settings
from pool.publisher import Publisher, PublishResult
from pool.store import Claim, SqlStore
from pool.store.base import Failure, Lease, first_line

log = logging.getLogger(__name__)

BACKOFF_START = 0.5
BACKOFF_CAP = 5.0  # low, so a poller resumes within seconds of an outage ending
# How long a paused poller waits before asking the broker for its queue depth again.
DEPTH_CHECK_INTERVAL = 0.25
# A claim that finds rows after a rest this many busy intervals long (at least two empty claims
# in a row) ends an idle spell: the other pollers are likely resting as long, or longer.
IDLE_SPELL_BUSY_INTERVALS = 4
T = TypeVar("T")


class StopSignal:
    """Set once on SIGTERM/SIGINT; after `grace` seconds in-flight work is released, not finished."""

    def __init__(self, grace: float = math.inf) -> None:
        self.event = threading.Event()
        self.grace = grace
        self.deadline = math.inf

    def request(self) -> None:
        if not self.event.is_set():
            self.deadline = time.monotonic() + self.grace
            self.event.set()

    def is_set(self) -> bool:
        return self.event.is_set()

    def wait(self, seconds: float | None = None) -> bool:
        return self.event.wait(seconds)

    def out_of_time(self) -> bool:
        return self.event.is_set() and time.monotonic() >= self.deadline


@dataclass
class BatchOutcome:
    claimed: int = 0
    published: int = 0
    acked: int = 0
    retried: int = 0
    dead: int = 0
    unsent: int = 0
    seconds: float = 0.0  # claim + publish + settle
    publish_seconds: float = 0.0
    settle_seconds: float = 0.0
    errors: list[str] = field(default_factory=list)


class PollerHooks(Protocol):
    """What the poller reports; metrics plug in here so the loop never imports them."""

    def loop(self, settings: Settings, shards: int) -> None:
        """Once per loop: the poller is alive, uses these settings and holds this many shards."""
        ...

    def claimed(self, rows: int, reclaimed: int, seconds: float) -> None: ...

    def batch_done(self, outcome: BatchOutcome) -> None: ...

    def database_error(self) -> None: ...

    def backpressure(self, paused: bool) -> None: ...


class NoHooks:
    def loop(self, settings: Settings, shards: int) -> None:
        pass

    def claimed(self, rows: int, reclaimed: int, seconds: float) -> None:
        pass

    def batch_done(self, outcome: BatchOutcome) -> None:
        pass

    def database_error(self) -> None:
        pass

    def backpressure(self, paused: bool) -> None:
        pass


class DepthProbe(Protocol):
    def depth(self) -> int | None: ...


@dataclass(frozen=True)
class PollerIdentity:
    owner: str
    index: int
    shard_count: int


class ShardSource(Protocol):
    """Which shards the poller claims from; pool.shards.ShardKeeper follows leases in the
    database, FixedShards is a fixed set."""

    shard_count: int
    held: list[int]

    def shards(self) -> list[int]: ...

    def leave(self) -> None: ...


class FixedShards:
    def __init__(self, shard_count: int, shards: list[int]) -> None:
        self.shard_count = shard_count
        self.held = shards

    def shards(self) -> list[int]:
        return self.held

    def leave(self) -> None:
        pass


class LeaseHeartbeat:
    """Extends a batch's lease while it is worked on, so a slow broker causes no false takeover.

    One thread serves every batch of a poller: starting and joining a thread per batch cost
    more CPU than a small batch's claim. It beats every lease/3 while a lease is held, and
    stops with close()."""

    def __init__(self, store: SqlStore, lease_seconds: float,
                 clock: Callable[[], float] | None = None) -> None:
        self.store = store
        self.lease_seconds = lease_seconds
        self.clock = clock or time.monotonic  # monotonic seconds; valid_until is on this clock
        self.valid_until = 0.0  # monotonic time until which our lease surely holds
        self._changed = threading.Condition()
        self._lease: Lease | None = None
        self._next_beat = math.inf
        self._closed = False
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def holding(self, lease: Lease) -> Iterator[None]:
        now = self.clock()
        self.valid_until = now + self.lease_seconds
        with self._changed:
            if self._thread is None:
                self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)
                self._thread.start()
            self._lease = lease
            self._next_beat = now + self.lease_seconds / 3
            self._changed.notify()
        try:
            yield
        finally:
            with self._changed:
                self._lease = None
                self._changed.notify()

    def _beat(self) -> None:
        while True:
            with self._changed:
                while not self._closed and (self._lease is None or self.clock() < self._next_beat):
                    timeout = None if self._lease is None else self._next_beat - self.clock()
                    self._changed.wait(timeout)
                if self._closed:
                    return
                lease = self._lease
                self._next_beat = self.clock() + self.lease_seconds / 3
            started = self.clock()
            try:
                self.store.extend_lease(lease, self.lease_seconds)
            except Exception as exc:  # noqa: BLE001 - a dead heartbeat would let leases lapse silently
                log.warning("could not extend lease: %s", first_line(exc))
                continue
            with self._changed:
                if self._lease is lease:  # the batch may have settled while we extended
                    self.valid_until = started + self.lease_seconds

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify()
        if self._thread is not None:
            self._thread.join()


class Poller:
    def __init__(
        self,
        store: SqlStore,
        publisher: Publisher,
        identity: PollerIdentity,
        settings: Settings,
        stop: StopSignal,
        hooks: PollerHooks | None = None,
        depth_probe: DepthProbe | None = None,
        rng: random.Random | None = None,
        shards: ShardSource | None = None,
    ) -> None:
        self.store = store
        self.publisher = publisher
        self.identity = identity
        self.shard_source = shards or FixedShards(identity.shard_count, [identity.index])
        self.settings = settings
        self.stop = stop
        self.hooks = hooks or NoHooks()
        self.depth_probe = depth_probe
        self.rng = rng or random.Random()
        self.heartbeat = LeaseHeartbeat(store, settings.lease_seconds)
        self.wake = store.wake_listener()
        self.paused = False
        self.rest = 0.0  # the rest due after the last claim, before jitter
        self._last_claimed = -1  # rows of the previous claim (-1: none yet)
        self._woken = False  # whether the last rest was cut short by a NOTIFY
        # Rows the broker has but whose ack gave up in a database outage: acked first thing
        # once the database answers again (see _settle).
        self._unacked: tuple[Lease, list[int]] | None = None
        self._db_failing = False
        self._broker_failing = False
        self._failing = False  # a batch failed for a reason that is neither database nor broker
        # When the current outage began (monotonic), for the seconds it lasted in the recovery line.
        self._db_down_since = self._broker_down_since = self._failing_since = 0.0

    # --- one batch -------------------------------------------------------------------
    def run_once(self) -> int:
        """Claim, publish and settle one batch. Returns how many rows were claimed."""
        started = time.perf_counter()
        s = self.settings
        self._ack_unacked()
        # Leases are renewed and shares rebalanced here, between batches.
        held = self.shard_source.shards()
        claim = self.store.claim(self.identity.owner, self.shard_source.shard_count, held,
                                 s.batch_size, s.lease_seconds)
        claimed_at = time.perf_counter()
        self.hooks.claimed(len(claim.rows), claim.reclaimed, claimed_at - started)
        if not claim.rows:
            return 0
        with self.heartbeat.holding(claim.lease):
            try:
                # Once the shutdown grace is spent, rows not yet published are released instead.
                result = self.publisher.publish(claim.rows, keep_going=lambda: not self.stop.out_of_time())
                published_at = time.perf_counter()
                outcome = self._settle(claim, result)
            except BaseException:
                self._release_unsettled(claim)
                raise
        finished = time.perf_counter()
        outcome.seconds = finished - started
        outcome.publish_seconds = published_at - claimed_at
        outcome.settle_seconds = finished - published_at
        self._note_broker(result.broker_error)
        self.hooks.batch_done(outcome)
        if log.isEnabledFor(logging.DEBUG):  # spares building the fields on every batch otherwise
            log.debug("batch done", extra={"fields": {
                "claimed": outcome.claimed, "reclaimed": claim.reclaimed, "published": outcome.published,
                "acked": outcome.acked, "retried": outcome.retried, "dead": outcome.dead,
                "unsent": outcome.unsent, "seconds": round(outcome.seconds, 3),
            }})
        return len(claim.rows)

    def _ack_unacked(self) -> None:
        """Ack the published rows of a batch whose ack gave up in a database outage, before
        anything else this poller asks of the database; a database error propagates, and the
        loop backs off and comes back here."""
        if self._unacked is None:
            return
        lease, ids = self._unacked
        acked = self.store.ack(lease, ids)
        self._unacked = None
        self._note_lease_lost(acked, len(ids))

    def _note_lease_lost(self, acked: int, published: int) -> None:
        if acked < published:
            log.warning("lease lost on %d of %d published rows; their new owner publishes them again",
                        published - acked, published,
                        extra={"fields": {"event": "lease_lost", "lost": published - acked,
                                          "published": published}})

    def _release_unsettled(self, claim: Claim) -> None:
        """After a failure mid-batch, give back at once the rows still leased to us (settled ones
        no longer are), rather than have them wait out the lease. Never rows the broker has:
        released, they would be claimed and published again at once."""
        unacked = set(self._unacked[1]) if self._unacked and self._unacked[0] == claim.lease else set()
        try:
            self.store.release(claim.lease, [row.id for row in claim.rows if row.id not in unacked])
        except Exception as exc:  # noqa: BLE001 - then the lease expires; nothing is lost
            log.warning("could not release a failed batch (its lease expires in %.0f s): %s",
                        self.settings.lease_seconds, first_line(exc))

    def _settle(self, claim: Claim, result: PublishResult) -> BatchOutcome:
        accepted, unsent = result.accepted, result.unsent
        outcome = BatchOutcome(claimed=len(claim.rows), published=len(accepted), unsent=len(unsent))
        # Only what the broker accepted is marked processed, and only under our lease. The ack
        # is retried through a database outage while the lease holds: giving up would make
        # another poller publish these rows a second time. Past that, the rows stay ours until
        # another poller claims them, which it cannot do before the database is back either:
        # so the ack is kept and tried first once it answers (an ack under a lease taken over
        # marks nothing), instead of being dropped.
        try:
            outcome.acked = self._until_done(lambda: self.store.ack(claim.lease, accepted))
        except DBAPIError:
            self._unacked = (claim.lease, list(accepted))
            raise
        self._note_lease_lost(outcome.acked, len(accepted))
        if result.rejected or result.failed:
            failures = self._failures(claim, result)
            self._until_done(lambda: self.store.nack(claim.lease, failures))
            outcome.dead = sum(f.dead for f in failures)
            outcome.retried = len(failures) - outcome.dead
        if unsent:
            self._until_done(lambda: self.store.release(claim.lease, unsent))
        return outcome

    def _failures(self, claim: Claim, result: PublishResult) -> list[Failure]:
        """A rejected row (its own values are the problem) is dead at once: trying again cannot
        help. A row the broker refused is tried again with backoff, until max_attempts."""
        s = self.settings
        attempts = {row.id: row.attempts + 1 for row in claim.rows}  # this attempt included
        failures = [Failure(id=row_id, error=error, dead=True, retry_in=0.0)
                    for row_id, error in result.rejected.items()]
        failures += [
            Failure(id=row_id, error=error, dead=attempts[row_id] >= s.max_attempts,
                    retry_in=retry_delay(attempts[row_id], s.retry_base_seconds, s.retry_cap_seconds,
                                         self.rng))
            for row_id, error in result.failed.items()
        ]
        for failure in failures:
            if failure.dead:
                permanent = failure.id in result.rejected
                log.warning("row %d is dead after %d attempt(s)%s: %s", failure.id, attempts[failure.id],
                            " (a permanent error)" if permanent else "", failure.error,
                            extra={"fields": {"event": "row_dead", "row_id": failure.id,
                                              "attempts": attempts[failure.id], "permanent": permanent,
                                              "error": failure.error}})
        return failures

    def _until_done(self, action: Callable[[], T]) -> T:
        """Retry a settling write through database errors while our lease is still ours."""
        delay = BACKOFF_START
        while True:
            try:
                return action()
            except DBAPIError as exc:
                if self.heartbeat.clock() + delay >= self.heartbeat.valid_until:
                    raise
                self.hooks.database_error()
                log.warning("database error while settling a batch, retrying: %s", first_line(exc))
                time.sleep(delay)  # not interruptible by SIGTERM: settling is what a drain waits for
                delay = min(delay * 2, 5.0)

    # --- backpressure ----------------------------------------------------------------
    def _must_pause(self) -> bool:
        high, low = self.settings.backpressure_high, self.settings.backpressure_low
        if not high or self.depth_probe is None:
            return False
        # Asked before every claim (one LLEN or passive declare): checking less often lets a
        # fast poller overshoot the mark by many batches.
        depth = self.depth_probe.depth()
        if depth is None:
            return self.paused
        if not self.paused and depth > high:
            self.paused = True
            log.warning("backpressure: queue %s holds %d messages (> %d); pausing claims",
                        self.settings.queue, depth, high, extra={"fields": {
                            "event": "backpressure_paused", "queue": self.settings.queue, "depth": depth,
                            "high": high}})
            self.hooks.backpressure(True)
        elif self.paused and depth < low:
            self.paused = False
            log.info("backpressure released: queue %s holds %d messages (< %d); claiming again",
                     self.settings.queue, depth, low, extra={"fields": {
                         "event": "backpressure_released", "queue": self.settings.queue, "depth": depth,
                         "low": low}})
            self.hooks.backpressure(False)
        return self.paused

    # --- the loop --------------------------------------------------------------------
    def _note_broker(self, error: str | None) -> None:
        # Log on state changes only, so an outage is two lines, not one per batch.
        if error and not self._broker_failing:
            self._broker_down_since = time.monotonic()
            log.error("broker unavailable, rows stay unprocessed and are retried: %s", error,
                      extra={"fields": {"event": "broker_unavailable", "error": error}})
        elif not error and self._broker_failing:
            log.info("broker reachable again", extra={"fields": {
                "event": "broker_reachable", "down_seconds": _since(self._broker_down_since)}})
        self._broker_failing = error is not None

    def run(self) -> None:
        """Relay until stopped. No exception ends the loop: a database or broker outage, or
        anything unexpected in a batch, releases that batch's rows, is logged once when it
        starts and once when it ends, and is retried with backoff."""
        if self.wake is not None:
            self.wake.listen()
        db_backoff = broker_backoff = failure_backoff = BACKOFF_START
        while not self.stop.is_set():
            try:
                claimed = self._turn()
            except DBAPIError as exc:
                self.hooks.database_error()
                if not self._db_failing:
                    self._db_down_since = time.monotonic()
                    log.error("database unavailable, retrying with backoff: %s", first_line(exc),
                              extra={"fields": {"event": "database_unavailable", "error": first_line(exc)}})
                self._db_failing = True
                self.stop.wait(db_backoff)
                db_backoff = min(db_backoff * 2, BACKOFF_CAP)
                continue
            except Exception as exc:  # noqa: BLE001 - the poller must outlive any one batch
                error = f"{type(exc).__name__}: {first_line(exc)}"
                if not self._failing:
                    self._failing_since = time.monotonic()
                    log.error("batch failed, its rows were released; retrying with backoff: %s", error,
                              extra={"fields": {"event": "batch_failed", "error": error}})
                self._failing = True
                self.stop.wait(failure_backoff)
                failure_backoff = min(failure_backoff * 2, BACKOFF_CAP)
                continue
            if self._failing:
                log.info("batches succeed again", extra={"fields": {
                    "event": "batches_succeed", "down_seconds": _since(self._failing_since)}})
                self._failing = False
            failure_backoff = BACKOFF_START
            if claimed is None:  # paused by backpressure
                continue
            if self._db_failing:
                log.info("database reachable again", extra={"fields": {
                    "event": "database_reachable", "down_seconds": _since(self._db_down_since)}})
                self._db_failing = False
            db_backoff = BACKOFF_START
            if self._broker_failing:
                self.stop.wait(broker_backoff)
                broker_backoff = min(broker_backoff * 2, BACKOFF_CAP)
                continue
            broker_backoff = BACKOFF_START
            self._wake_peers_after_idle_spell(claimed)
            self.rest = self._rest_after(claimed)
            self._woken = self._idle(self._jittered(claimed, self.rest)) if self.rest else False

    def _turn(self) -> int | None:
        """One turn of the loop: a batch, or a short wait while backpressure pauses (None)."""
        # Alive, and with these settings: said on every turn, paused or failing ones too.
        self.hooks.loop(self.settings, len(self.shard_source.held))
        self._ack_unacked()  # before a pause, which may outlast the lease
        if self._must_pause():
            # A paused poller still heartbeats its membership and renews its shard leases: it
            # resumes on its own shards, and status does not count it gone.
            self.shard_source.shards()
            self.stop.wait(min(self.settings.poll_interval, DEPTH_CHECK_INTERVAL))
            return None
        return self.run_once()

    def _rest_after(self, claimed: int) -> float:
        """How long to rest after a claim of `claimed` rows.

        A full batch means more is waiting: no rest. A partial one means rows are arriving:
        poll again after the busy interval, which bounds latency under load. Each empty claim
        doubles the rest, up to the poll interval, so idle pollers cost next to nothing. A
        NOTIFY (the insert trigger's, or another poller's after an idle spell) ends any rest at
        once; if it found nothing here, rows are arriving elsewhere, so the doubling starts
        again from the busy interval."""
        s = self.settings
        if claimed >= s.batch_size:
            return 0.0
        busy = min(s.busy_poll_interval, s.poll_interval)
        if claimed or self._woken:
            return busy
        return min(max(self.rest * 2, busy), s.poll_interval)

    def _jittered(self, claimed: int, rest: float) -> float:
        """An idle rest is drawn between half and all of its length. Pollers started together
        (or left idle together when a load stops) would otherwise rest in step, and the first
        rows after a quiet spell would wait out the same long rest on every poller; spread out,
        one poller's timer ends soon and wakes the others. Rests under load stay exact, since
        they bound latency."""
        return rest if claimed else rest * self.rng.uniform(0.5, 1.0)

    def _wake_peers_after_idle_spell(self, claimed: int) -> None:
        """Rows after an idle spell: wake the other pollers now.

        Idle pollers rest up to the poll interval, each on its own timer, so without the insert
        trigger the first rows after a quiet spell would wait up to that long on every other
        poller's shards. One NOTIFY when the first poller finds them cuts that to milliseconds.
        A steady load keeps rests at the busy interval, so it sends none. A poller woken by a
        NOTIFY sends none either: that one woke the others too."""
        s = self.settings
        idle_rest = min(IDLE_SPELL_BUSY_INTERVALS * s.busy_poll_interval, s.poll_interval)
        idle_spell = self._last_claimed == 0 and self.rest >= idle_rest
        if claimed and idle_spell and not self._woken and self.wake is not None:
            self.wake.wake_peers()
            log.debug("rows after %.2f s of rest: woke the other pollers", self.rest)
        self._last_claimed = claimed

    def _idle(self, seconds: float) -> bool:
        """Rest; True if a NOTIFY ended the rest early."""
        if self.wake is None:
            self.stop.wait(seconds)
            return False
        return self.wake.wait(seconds, self.stop.is_set)

    def close(self) -> None:
        self.heartbeat.close()
        self.shard_source.leave()
        if self.wake is not None:
            self.wake.close()


def _since(started: float) -> float:
    return round(time.monotonic() - started, 3)
