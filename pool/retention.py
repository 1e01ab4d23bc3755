"""Retention: delete processed rows past an age in bounded batches, so the table stops growing.

No SQL here (the store has it) and no output: `pool prune` draws its progress bar from the
callback, and a long-lived process can run the same loop and stop it between batches."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Protocol

from pool.store.base import first_line

log = logging.getLogger(__name__)


class PrunableStore(Protocol):
    def prune_processed(self, older_than_seconds: float, batch_rows: int) -> int: ...


class Pruner:
    """Deletes processed rows older than `older_than_seconds`, at most `batch_rows` per transaction."""

    def __init__(self, store: PrunableStore, older_than_seconds: float, batch_rows: int) -> None:
        # A zero batch would delete nothing and never come up short, so run() would not end.
        if batch_rows < 1:
            raise ValueError(f"batch_rows must be at least 1, got {batch_rows!r}")
        self.store = store
        self.older_than_seconds = older_than_seconds
        self.batch_rows = batch_rows

    def run(self, progress: Callable[[int], None] | None = None,
            should_stop: Callable[[], bool] = lambda: False) -> int:
        """Prune batch after batch until one comes up short; returns the rows deleted.

        `progress` gets each batch's count, the last (short, maybe 0) one included.
        `should_stop` is asked before each batch; rows already deleted stay deleted."""
        total = 0
        while not should_stop():
            deleted = self.store.prune_processed(self.older_than_seconds, self.batch_rows)
            total += deleted
            if progress is not None:
                progress(deleted)
            # Short means nothing more qualified, or the rest is locked by someone else
            # (PostgreSQL skips those rows); either way the next run takes what is left.
            if deleted < self.batch_rows:
                break
        return total


class PeriodicPrune:
    """The coordinator's automatic retention: one Pruner run now and every `every` seconds after,
    in a thread of its own, until stop()."""

    def __init__(self, pruner: Pruner, every: float, describe_age: str) -> None:
        self.pruner = pruner
        self.every = every
        self.describe_age = describe_age
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="periodic-prune", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                deleted = self.pruner.run(should_stop=self._stop.is_set)
            except Exception as exc:  # noqa: BLE001 - a database outage must not end retention
                log.warning("pruning failed, trying again in %.0f s: %s", self.every, first_line(exc))
            else:
                if deleted:
                    log.info("pruned %d processed rows older than %s", deleted, self.describe_age)
            self._stop.wait(self.every)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
