"""Metric definitions and the poller hooks that feed them.

Import this module only in processes started after PROMETHEUS_MULTIPROC_DIR is set:
prometheus_client picks its multi-process value class when it is first imported."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from pool.poller import BatchOutcome

CLAIMED = Counter("pool_signals_claimed", "Rows claimed (leased) by pollers", ["worker"])
PUBLISHED = Counter("pool_signals_published", "Rows accepted by the broker", ["worker"])
ACKED = Counter("pool_signals_acked", "Rows marked processed after publishing", ["worker"])
RETRIED = Counter("pool_signals_retried", "Rows that failed to publish and wait for a retry", ["worker"])
DEAD = Counter("pool_signals_dead", "Rows that used up their attempts and are dead", ["worker"])
FAILED = Counter(
    "pool_signals_failed", "Rows not published: bad input (rejected) or broker down (unsent)",
    ["worker", "reason"],
)
DATABASE_ERRORS = Counter("pool_database_errors", "Failed database round trips", ["worker"])
BACKPRESSURE_PAUSES = Counter(
    "pool_backpressure_pauses", "Times claiming paused because the broker queue was too deep", ["worker"]
)
BACKPRESSURE_PAUSED = Gauge(
    "pool_backpressure_paused", "1 while a poller is paused by backpressure", ["worker"],
    multiprocess_mode="livemax",
)
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
        self._retried = RETRIED.labels(label)
        self._dead = DEAD.labels(label)
        self._rejected = FAILED.labels(label, "rejected")
        self._unsent = FAILED.labels(label, "unsent")
        self._db_errors = DATABASE_ERRORS.labels(label)
        self._pauses = BACKPRESSURE_PAUSES.labels(label)
        self._paused = BACKPRESSURE_PAUSED.labels(label)
        self._paused.set(0)
        self._batch = BATCH_SECONDS.labels(label)

    def batch_done(self, outcome: BatchOutcome) -> None:
        self._claimed.inc(outcome.claimed)
        self._published.inc(outcome.published)
        self._acked.inc(outcome.acked)
        self._retried.inc(outcome.retried)
        self._dead.inc(outcome.dead)
        self._rejected.inc(outcome.retried + outcome.dead)
        self._unsent.inc(outcome.unsent)
        self._batch.observe(outcome.seconds)

    def database_error(self) -> None:
        self._db_errors.inc()

    def backpressure(self, paused: bool) -> None:
        if paused:
            self._pauses.inc()
        self._paused.set(1 if paused else 0)
