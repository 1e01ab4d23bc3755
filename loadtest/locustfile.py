"""Locust load for pool: insert signals into PostgreSQL at a steady rate while `pool start` runs,
and measure how long each row takes from its INSERT to the Celery queue on Redis.

    PULSE_DB_URL=postgresql://root@127.0.0.1:5432/test PULSE_BROKER_URL=redis://127.0.0.1:6379/12 \\
    POOL_LOAD_RATE=2000 locust -f loadtest/locustfile.py --headless --users 20 --spawn-rate 20 \\
        --run-time 60s --csv out/latency --stop-timeout 5

(`python loadtest/run_latency.py` does the whole measurement: fresh schema, fresh Redis
database, `pool start`, this locustfile, clean-up, and prints the figures.)

It reports two kinds of request through locust's request event, so both land in the console
stats and in `<csv>_stats.csv` (count, failures, median, 95%, 99%, average, requests/s):

- `sql` / `insert`: one `INSERT INTO signals (name, value, source, timestamp)` per task, on the
  user's own psycopg 3 connection, committed on its own (autocommit: the single statement is
  its own transaction, so the row is committed when the call returns). `timestamp` is the
  client's clock in UTC just before the insert. Response time is the insert's round trip.
- `relay` / `insert->broker`: one background greenlet per locust process takes the place of
  the Celery worker. It pops the queue with BRPOP (1 s timeout; then RPOP with a count for
  whatever else is already waiting, so it does not lag behind), decodes each message's payload
  and fires `now - payload timestamp`. That is insert-to-broker latency: the insert round trip,
  the poller's rest and claim, the publish, and at most one pop round trip.

When the load stops, the consumer keeps reading for up to POOL_LOAD_DRAIN_SECONDS so rows
inserted in the last moments are measured too; rows still not on the broker then are reported
as `insert->broker` failures (in a single locust process, where every inserted id is known).

Environment:
    PULSE_DB_URL              postgresql://... (default postgresql://root@127.0.0.1:5432/test)
    PULSE_BROKER_URL          redis://... only (default redis://127.0.0.1:6379/0)
    PULSE_QUEUE               Celery queue / Redis list (default celery)
    PULSE_DB_TABLE            table (default signals); PULSE_DB_COLUMN_NAME etc. as in pool
    POOL_LOAD_RATE            total inserts per second over all users (default 2000)
    POOL_LOAD_PACING          `steady` (default): a per-user schedule that makes up for late
                              wake-ups (at most 1 s worth); `constant_throughput`: locust's own,
                              which never catches up and so lands below the target under load
    POOL_LOAD_DRAIN_SECONDS   how long to keep consuming after the load stops (default 10)
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import random
import time
from datetime import UTC, datetime

# `locust` sorts before psycopg and redis, and importing it monkey-patches the standard library
# for gevent (under `locust -f` that has happened before this file loads anyway): psycopg then
# picks its gevent-friendly wait function, and redis-py uses patched sockets.
import gevent
import locust.stats
import psycopg
import redis
from locust import User, constant_throughput, events, task
from locust.runners import LocalRunner, MasterRunner
from psycopg import sql

log = logging.getLogger("pool.loadtest")

DB_URL = os.environ.get("PULSE_DB_URL", "postgresql://root@127.0.0.1:5432/test")
BROKER_URL = os.environ.get("PULSE_BROKER_URL", "redis://127.0.0.1:6379/0")
QUEUE = os.environ.get("PULSE_QUEUE", "celery")
TABLE = os.environ.get("PULSE_DB_TABLE", "signals")
COLUMNS = [os.environ.get(f"PULSE_DB_COLUMN_{c.upper()}", c)
           for c in ("name", "value", "source", "timestamp")]
RATE = float(os.environ.get("POOL_LOAD_RATE", "2000"))
PACING = os.environ.get("POOL_LOAD_PACING", "steady")
DRAIN_SECONDS = float(os.environ.get("POOL_LOAD_DRAIN_SECONDS", "10"))

BRPOP_TIMEOUT = 1
POP_COUNT = 1000
CATCH_UP_LIMIT = 1.0  # a user more than this far behind its schedule starts afresh, no burst
RECONNECT_DELAY = 0.5
# kombu's Redis transport: priority 0 is the queue itself, the others are sub-queues.
PRIORITY_KEYS = [QUEUE] + [f"{QUEUE}\x06\x16{p}" for p in (3, 6, 9)]
SIGNAL_NAMES = ("temperature", "pressure", "humidity", "vibration")


def _check_settings() -> str:
    if not BROKER_URL.startswith("redis://"):
        raise SystemExit(f"PULSE_BROKER_URL must be redis://..., not {BROKER_URL.split(':', 1)[0]}://")
    if not RATE > 0:
        raise SystemExit(f"POOL_LOAD_RATE must be a positive number of inserts/s, not {RATE}")
    if PACING not in ("steady", "constant_throughput"):
        raise SystemExit(f"POOL_LOAD_PACING must be steady or constant_throughput, not {PACING!r}")
    # pool accepts SQLAlchemy-style URLs; libpq wants the plain scheme.
    url = DB_URL.replace("postgresql+psycopg://", "postgresql://", 1)
    if not url.startswith(("postgresql://", "postgres://")):
        raise SystemExit("PULSE_DB_URL must be a postgresql:// URL")
    return url


PG_URL = _check_settings()
INSERT = sql.SQL("INSERT INTO {} ({}) VALUES (%s, %s, %s, %s) RETURNING {}").format(
    sql.Identifier(TABLE), sql.SQL(", ").join(map(sql.Identifier, COLUMNS)),
    sql.Identifier(os.environ.get("PULSE_DB_COLUMN_ID", "id")),
)


class NotRelayed(Exception):
    """An inserted row whose message did not reach the broker before the drain ran out."""


class Relay:
    """Consumes the Celery queue like a worker would, and turns every message into a latency."""

    def __init__(self, environment, exact: bool) -> None:
        self.environment = environment
        self.exact = exact  # one locust process: every inserted id passes through here
        self.started_at = time.time()
        self.pending: dict[int, float] = {}  # inserted, not seen on the broker yet: id -> wall time
        self.seen: set[int] = set()
        self.relayed = self.stale = self.duplicates = self.undecodable = 0
        self.stopping = False
        self.greenlet: gevent.Greenlet | None = None

    def start(self) -> None:
        self.greenlet = gevent.spawn(self._run)

    def inserted(self, row_id: int, at: float) -> None:
        if self.exact and row_id not in self.seen:
            self.pending[row_id] = at

    def _fire(self, response_time: float, exception: Exception | None = None) -> None:
        self.environment.events.request.fire(
            request_type="relay", name="insert->broker", response_time=response_time,
            response_length=0, exception=exception, context={},
        )

    def _run(self) -> None:
        client = redis.Redis.from_url(BROKER_URL, socket_timeout=BRPOP_TIMEOUT + 5, socket_connect_timeout=5)
        failing = False
        try:
            while not self.stopping:
                try:
                    item = client.brpop(PRIORITY_KEYS, timeout=BRPOP_TIMEOUT)
                    if item is None:
                        continue
                    self._handle(item[1], time.time())
                    # Whatever else is already waiting, without a round trip per message.
                    more = client.rpop(item[0], POP_COUNT)
                    received = time.time()
                    for raw in more or ():
                        self._handle(raw, received)
                except redis.RedisError as exc:
                    if not failing:
                        log.warning("broker consumer: %s; retrying", exc)
                    failing = True
                    gevent.sleep(1)
                    continue
                if failing:
                    log.info("broker consumer: reading again")
                    failing = False
        finally:
            client.close()

    def _handle(self, raw: bytes, received: float) -> None:
        try:
            envelope = json.loads(raw)
            body = envelope["body"]
            if envelope["properties"].get("body_encoding") == "base64":
                body = base64.b64decode(body)
            args, _kwargs, _embed = json.loads(body)
            payload = args[0]
            row_id = int(payload["id"])
            stamped = datetime.fromisoformat(payload["timestamp"]).timestamp()
        except Exception as exc:  # noqa: BLE001 - a message we cannot read is a failed measurement
            self.undecodable += 1
            self._fire(0.0, exc)
            return
        if stamped < self.started_at:
            self.stale += 1  # a row from before this test (a queue that was not empty)
            return
        if row_id in self.seen:
            self.duplicates += 1  # at-least-once: a redelivery is not a second latency
            return
        self.seen.add(row_id)
        self.pending.pop(row_id, None)
        self.relayed += 1
        self._fire(max(0.0, received - stamped) * 1000.0)

    def drain_and_stop(self) -> None:
        deadline = time.monotonic() + DRAIN_SECONDS
        while time.monotonic() < deadline and (self.pending or not self.exact):
            gevent.sleep(0.1)
        self.stopping = True
        if self.greenlet is not None:
            self.greenlet.join(timeout=BRPOP_TIMEOUT + 6)
            self.greenlet.kill(block=True, timeout=2)
        if self.exact and self.pending:
            now = time.time()
            error = NotRelayed(f"not on the broker {DRAIN_SECONDS:g} s after the load stopped")
            for inserted_at in self.pending.values():
                self._fire((now - inserted_at) * 1000.0, error)
        log.info(
            "insert->broker: %d relayed, %d not relayed, %d duplicates skipped, %d stale skipped,"
            " %d undecodable", self.relayed, len(self.pending) if self.exact else -1,
            self.duplicates, self.stale, self.undecodable,
        )
        self.pending.clear()


class InsertTally:
    """Inserts of this process, to report the rate over the load phase alone (first to last)."""

    def __init__(self) -> None:
        self.ok = self.failed = 0
        self.first = self.last = 0.0

    def add(self, ok: bool) -> None:
        now = time.time()
        if not self.first:
            self.first = now
        self.last = now
        if ok:
            self.ok += 1
        else:
            self.failed += 1

    def report(self) -> None:
        span = self.last - self.first
        rate = self.ok / span if span > 0 else 0.0
        log.info("inserts: %d ok, %d failed, %.1f s from first to last, %.1f committed inserts/s (target %g)",
                 self.ok, self.failed, span, rate, RATE)


RELAY: Relay | None = None
TALLY = InsertTally()


@events.test_start.add_listener
def on_test_start(environment, **_kwargs) -> None:
    global RELAY, TALLY
    if isinstance(environment.runner, MasterRunner):
        return  # the workers insert and consume; the master only adds up their stats
    TALLY = InsertTally()
    RELAY = Relay(environment, exact=isinstance(environment.runner, LocalRunner))
    RELAY.start()


@events.test_stop.add_listener
def on_test_stop(environment, **_kwargs) -> None:
    global RELAY
    relay, RELAY = RELAY, None
    if relay is None:
        return
    TALLY.report()
    relay.drain_and_stop()
    options = environment.parsed_options
    if options is not None and getattr(options, "csv_prefix", None):
        # The CSV writer rewrites the stats once per interval and not again at exit.
        gevent.sleep(locust.stats.CSV_STATS_INTERVAL_SEC + 0.5)


@events.quitting.add_listener
def on_quitting(**_kwargs) -> None:
    relay = RELAY
    if relay is not None and relay.greenlet is not None:
        relay.stopping = True
        relay.greenlet.kill(block=True, timeout=BRPOP_TIMEOUT + 2)


class SignalInserter(User):
    """Inserts one signal per task at POOL_LOAD_RATE / users per second."""

    def on_start(self) -> None:
        options = self.environment.parsed_options
        users = getattr(options, "num_users", None) or self.environment.runner.target_user_count or 1
        self.interval = users / RATE
        self.throughput = constant_throughput(RATE / users)
        self.next_run = time.monotonic()
        self.conn: psycopg.Connection | None = None
        self.retry_at = 0.0
        self.source = f"locust-{random.getrandbits(32):08x}"

    def wait_time(self) -> float:
        if PACING == "constant_throughput":
            return self.throughput(self)
        now = time.monotonic()
        self.next_run += self.interval
        if self.next_run < now - CATCH_UP_LIMIT:
            self.next_run = now
        return max(0.0, self.next_run - now)

    def on_stop(self) -> None:
        self._drop_connection()

    def _drop_connection(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            with contextlib.suppress(Exception):  # a broken connection may fail to close, too
                conn.close()

    @task
    def insert(self) -> None:
        if self.conn is None and time.monotonic() < self.retry_at:
            gevent.sleep(self.retry_at - time.monotonic())
        stamp = datetime.now(UTC)
        start = time.perf_counter()
        try:
            if self.conn is None:
                self.conn = psycopg.connect(PG_URL, autocommit=True, connect_timeout=5)
            row = self.conn.execute(INSERT, (random.choice(SIGNAL_NAMES), random.uniform(-50.0, 150.0),
                                             self.source, stamp)).fetchone()
        except Exception as exc:  # noqa: BLE001 - every database error is a failed insert
            elapsed = (time.perf_counter() - start) * 1000.0
            self._drop_connection()
            self.retry_at = time.monotonic() + RECONNECT_DELAY
            self.environment.events.request.fire(request_type="sql", name="insert", response_time=elapsed,
                                                 response_length=0, exception=exc, context={})
            TALLY.add(False)
            return
        # Reached only when the row is committed: a user killed mid-insert (GreenletExit is no
        # Exception) fires nothing, neither success nor failure.
        elapsed = (time.perf_counter() - start) * 1000.0
        self.environment.events.request.fire(request_type="sql", name="insert", response_time=elapsed,
                                             response_length=0, exception=None, context={})
        TALLY.add(True)
        relay = RELAY
        if relay is not None and row is not None:
            relay.inserted(row[0], stamp.timestamp())
