"""Metric definitions and the poller hooks that feed them.

Import this module only in processes started after PROMETHEUS_MULTIPROC_DIR is set:
prometheus_client picks its multi-process value class when it is first imported."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from pool.publisher import PublishResult

CLAIMED = Counter("pool_signals_claimed", "Rows claimed (leased) by pollers", ["worker"])
PUBLISHED = Counter("pool_signals_published", "Rows accepted by the broker", ["worker"])
ACKED = Counter("pool_signals_acked", "Rows marked processed after publishing", ["worker"])
FAILED = Counter(
    "pool_signals_failed", "Rows not published: bad input (rejected) or broker down (unsent)",
    ["worker", "reason"],
)
DATABASE_ERRORS = Counter("pool_database_errors", "Failed database round trips", ["worker"])
BATCH_SECONDS = Histogram(
    "pool_batch_duration_seconds", "Claim + publish + ack time of one non-empty batch", ["worker"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)


class PrometheusHooks:
    """PollerHooks that count into the multi-process registry."""

    def __init__(self, worker_index: int) -> None:
        label = str(worker_index)
        self._claimed = CLAIMED.labels(label)
        self._published = PUBLISHED.labels(label)
        self._acked = ACKED.labels(label)
        self._rejected = FAILED.labels(label, "rejected")
        self._unsent = FAILED.labels(label, "unsent")
        self._db_errors = DATABASE_ERRORS.labels(label)
        self._batch = BATCH_SECONDS.labels(label)

    def batch_done(self, claimed: int, result: PublishResult, acked: int, seconds: float) -> None:
        self._claimed.inc(claimed)
        self._published.inc(len(result.accepted))
        self._acked.inc(acked)
        self._rejected.inc(len(result.rejected))
        self._unsent.inc(len(result.unsent))
        self._batch.observe(seconds)

    def database_error(self) -> None:
        self._db_errors.inc()
