"""The claim -> publish -> ack/nack loop of one poller. No SQL and no prometheus here."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Protocol

from sqlalchemy.exc import DBAPIError

from pool.publisher import Publisher, PublishResult
from pool.store import SqlStore
from pool.store.base import first_line

log = logging.getLogger(__name__)

REJECTED_RETRY_SECONDS = 60.0
BACKOFF_START = 0.5
BACKOFF_CAP = 30.0


class PollerHooks(Protocol):
    """What the poller reports; metrics plug in here so the loop never imports them."""

    def batch_done(self, claimed: int, result: PublishResult, acked: int, seconds: float) -> None: ...

    def database_error(self) -> None: ...


class NoHooks:
    def batch_done(self, claimed: int, result: PublishResult, acked: int, seconds: float) -> None:
        pass

    def database_error(self) -> None:
        pass


@dataclass(frozen=True)
class PollerIdentity:
    owner: str
    index: int
    shard_count: int


class Poller:
    def __init__(
        self,
        store: SqlStore,
        publisher: Publisher,
        identity: PollerIdentity,
        batch_size: int,
        lease_seconds: float,
        poll_interval: float,
        stop: threading.Event,
        hooks: PollerHooks | None = None,
    ) -> None:
        self.store = store
        self.publisher = publisher
        self.identity = identity
        self.batch_size = batch_size
        self.lease_seconds = lease_seconds
        self.poll_interval = poll_interval
        self.stop = stop
        self.hooks = hooks or NoHooks()
        self._db_failing = False
        self._broker_failing = False

    def run_once(self) -> int:
        """Claim, publish and settle one batch. Returns how many rows were claimed."""
        started = time.perf_counter()
        claim = self.store.claim(
            self.identity.owner, self.identity.shard_count, self.identity.index,
            self.batch_size, self.lease_seconds,
        )
        if not claim.rows:
            return 0
        result = self.publisher.publish(claim.rows)
        # Only what the broker accepted is marked processed, and only under our lease.
        acked = self.store.ack(claim.lease, result.accepted)
        if acked < len(result.accepted):
            log.warning(
                "lease lost on %d of %d published rows; their new owner will publish them again",
                len(result.accepted) - acked, len(result.accepted),
            )
        if result.rejected:
            self.store.nack(claim.lease, result.rejected, REJECTED_RETRY_SECONDS)
            log.warning("%d row(s) could not be published, e.g. %s",
                        len(result.rejected), next(iter(result.rejected.values())))
        if result.unsent:
            self.store.release(claim.lease, result.unsent)
        self._note_broker(result.broker_error)
        self.hooks.batch_done(len(claim.rows), result, acked, time.perf_counter() - started)
        log.debug("batch claimed=%d accepted=%d acked=%d rejected=%d unsent=%d",
                  len(claim.rows), len(result.accepted), acked, len(result.rejected), len(result.unsent))
        return len(claim.rows)

    def _note_broker(self, error: str | None) -> None:
        # Log on state changes only, so an outage is two lines, not one per batch.
        if error and not self._broker_failing:
            log.error("broker unavailable, rows stay unprocessed: %s", error)
        elif not error and self._broker_failing:
            log.info("broker reachable again")
        self._broker_failing = error is not None

    def run(self) -> None:
        backoff = BACKOFF_START
        broker_backoff = BACKOFF_START
        while not self.stop.is_set():
            try:
                claimed = self.run_once()
            except DBAPIError as exc:
                self.hooks.database_error()
                if not self._db_failing:
                    log.error("database error, retrying with backoff: %s", first_line(exc))
                self._db_failing = True
                self.stop.wait(backoff)
                backoff = min(backoff * 2, BACKOFF_CAP)
                continue
            if self._db_failing:
                log.info("database reachable again")
                self._db_failing = False
            backoff = BACKOFF_START
            if self._broker_failing:
                self.stop.wait(broker_backoff)
                broker_backoff = min(broker_backoff * 2, BACKOFF_CAP)
                continue
            broker_backoff = BACKOFF_START
            if claimed < self.batch_size:
                # A full batch means more is waiting: poll again at once; otherwise rest.
                self.stop.wait(self.poll_interval)
