"""Between batches the lease heartbeat sleeps: an idle poller costs no CPU."""

from __future__ import annotations

import time

from pool.poller import LeaseHeartbeat
from pool.store import Lease
from tests.helpers import SteppedClock, move_clock
from tests.unit.test_poller import BeatRecordingStore


class CountingClock(SteppedClock):
    def __init__(self, now: float) -> None:
        super().__init__(now)
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return self.now


def test_between_batches_the_heartbeat_waits_without_looking_at_the_clock() -> None:
    clock = CountingClock(100.0)
    store = BeatRecordingStore(clock)
    heartbeat = LeaseHeartbeat(store, 30.0, clock=clock)
    try:
        with heartbeat.holding(Lease(owner="me", token=1)):
            pass
        # Long past the beat the batch would have had: with no lease held there is nothing to
        # beat for, so the thread must sleep until the next batch, not spin on a due time.
        move_clock(heartbeat, clock, 200.0)
        time.sleep(0.2)
        reads = clock.reads
        time.sleep(0.2)
        assert clock.reads - reads <= 1
        assert store.beats == []
    finally:
        heartbeat.close()
