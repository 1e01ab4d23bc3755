"""Metric definitions and the poller hooks that feed them.

Import this module only in poller processes started after PROMETHEUS_MULTIPROC_DIR is set, and
after `use_worker_files` chose the files' names: prometheus_client picks its value class when a
labelled metric is first used.
"""

from __future__ import annotations

import os
import time

from prometheus_client import Counter, Gauge, Histogram, values

from pool.config import Settings
from pool.poller import BatchOutcome

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SIZE_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)

CLAIMED = Counter("pool_signals_claimed", "Rows claimed (leased) by pollers", ["worker"])
PUBLISHED = Counter("pool_signals_published", "Rows accepted by the broker", ["worker"])
ACKED = Counter("pool_signals_acked", "Rows marked processed after publishing", ["worker"])
RETRIED = Counter("pool_signals_retried", "Rows that failed to publish and wait for a retry", ["worker"])
DEAD = Counter("pool_signals_dead", "Rows that became dead letters: a permanent error, or attempts used up",
              ["worker"])
RECLAIMED = Counter(
    "pool_signals_reclaimed", "Rows claimed after another poller's lease on them expired", ["worker"]
)
PUBLISH_ERRORS = Counter(
    "pool_publish_errors", "Rows not published: bad input (rejected) or broker unavailable (unsent)",
    ["worker", "reason"],
)
DATABASE_ERRORS = Counter("pool_database_errors", "Failed database round trips", ["worker"])
BACKPRESSURE_PAUSES = Counter(
    "pool_backpressure_pauses", "Times claiming paused because the broker queue was too deep", ["worker"]
)
# live*: a dead poller's values disappear with it (mark_process_dead removes its file).
BACKPRESSURE_PAUSED = Gauge(
    "pool_backpressure_paused", "1 while a poller is paused by backpressure", ["worker"],
    multiprocess_mode="livemax",
)
HEARTBEAT = Gauge(
    "pool_poller_heartbeat_timestamp_seconds", "Unix time of the poller's last loop", ["worker"],
    multiprocess_mode="livemax",
)
STARTED = Gauge(
    "pool_poller_start_time_seconds", "Unix time the poller process started", ["worker"],
    multiprocess_mode="livemax",
)
PID = Gauge("pool_poller_pid", "Process id of the poller", ["worker"], multiprocess_mode="livemax")
BATCH_SIZE_SETTING = Gauge(
    "pool_poller_batch_size", "Rows per claim the poller uses now (changes on reload)", ["worker"],
    multiprocess_mode="livemax",
)
POLL_INTERVAL_SETTING = Gauge(
    "pool_poller_poll_interval_seconds", "Idle poll interval the poller uses now (changes on reload)",
    ["worker"], multiprocess_mode="livemax",
)
SHARDS_HELD = Gauge(
    "pool_poller_shards", "Shards the poller holds leases on", ["worker"], multiprocess_mode="livemax",
)
BATCH_SECONDS = Histogram(
    "pool_batch_duration_seconds", "Claim + publish + ack time of one non-empty batch", ["worker"],
    buckets=LATENCY_BUCKETS,
)
CLAIM_SECONDS = Histogram(
    "pool_claim_duration_seconds", "Time of one claim statement, empty claims included", ["worker"],
    buckets=LATENCY_BUCKETS,
)
PUBLISH_SECONDS = Histogram(
    "pool_publish_duration_seconds", "Time to publish one batch to the broker", ["worker"],
    buckets=LATENCY_BUCKETS,
)
ACK_SECONDS = Histogram(
    "pool_ack_duration_seconds", "Time to settle one batch (ack, nack, release) in the database",
    ["worker"], buckets=LATENCY_BUCKETS,
)
BATCH_ROWS = Histogram(
    "pool_batch_size_rows", "Rows in one non-empty claimed batch", ["worker"], buckets=SIZE_BUCKETS,
)


def use_worker_files(worker: str) -> None:
    """Name this process's metric files after its worker slot instead of its pid.

    A restarted poller then reopens its predecessor's files: its counters go on from the
    totals already counted, and restarts add no files for every scrape to read."""
    values.ValueClass = values.MultiProcessValue(process_identifier=lambda: worker)


class PrometheusHooks:
    """PollerHooks that count into the multi-process registry."""

    def __init__(self, worker_index: int) -> None:
        label = str(worker_index)
        self._claimed = CLAIMED.labels(label)
        self._published = PUBLISHED.labels(label)
        self._acked = ACKED.labels(label)
        self._retried = RETRIED.labels(label)
        self._dead = DEAD.labels(label)
        self._reclaimed = RECLAIMED.labels(label)
        self._rejected = PUBLISH_ERRORS.labels(label, "rejected")
        self._unsent = PUBLISH_ERRORS.labels(label, "unsent")
        self._db_errors = DATABASE_ERRORS.labels(label)
        self._pauses = BACKPRESSURE_PAUSES.labels(label)
        self._paused = BACKPRESSURE_PAUSED.labels(label)
        self._paused.set(0)
        self._heartbeat = HEARTBEAT.labels(label)
        STARTED.labels(label).set(time.time())
        PID.labels(label).set(os.getpid())
        self._batch_size = BATCH_SIZE_SETTING.labels(label)
        self._poll_interval = POLL_INTERVAL_SETTING.labels(label)
        self._shards = SHARDS_HELD.labels(label)
        self._batch = BATCH_SECONDS.labels(label)
        self._claim = CLAIM_SECONDS.labels(label)
        self._publish = PUBLISH_SECONDS.labels(label)
        self._ack = ACK_SECONDS.labels(label)
        self._rows = BATCH_ROWS.labels(label)

    def loop(self, settings: Settings, shards: int) -> None:
        self._heartbeat.set(time.time())
        self._shards.set(shards)
        self._batch_size.set(settings.batch_size)
        self._poll_interval.set(settings.poll_interval)

    def claimed(self, rows: int, reclaimed: int, seconds: float) -> None:
        self._claim.observe(seconds)
        if rows:
            self._claimed.inc(rows)
            self._reclaimed.inc(reclaimed)
            self._rows.observe(rows)

    def batch_done(self, outcome: BatchOutcome) -> None:
        self._published.inc(outcome.published)
        self._acked.inc(outcome.acked)
        self._retried.inc(outcome.retried)
        self._dead.inc(outcome.dead)
        self._rejected.inc(outcome.retried + outcome.dead)
        self._unsent.inc(outcome.unsent)
        self._batch.observe(outcome.seconds)
        self._publish.observe(outcome.publish_seconds)
        self._ack.observe(outcome.settle_seconds)

    def database_error(self) -> None:
        self._db_errors.inc()

    def backpressure(self, paused: bool) -> None:
        if paused:
            self._pauses.inc()
        self._paused.set(1 if paused else 0)

