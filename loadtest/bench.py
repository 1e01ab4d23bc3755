"""Benchmark pool against the old seed-style loop and the database-only and broker-only limits.

    python loadtest/bench.py                        # 100,000 rows; pool with 1, 2, 4 and 8 workers
    python loadtest/bench.py --quick --out /tmp/b   # smoke run: 5,000 rows; 1 and 2 workers

Every measurement runs in the same invocation on the same data size:

- pool start: `python -m pool start --workers N` on a fresh PostgreSQL schema seeded with M rows.
  The clock starts at its "ready:" log line. It stops when `SELECT count(*) FROM signals WHERE
  processed = 0` returns 0. That query is polled every 50 ms once LLEN of the queue has reached M,
  and once a second before that. A count(*) scans the whole table, every claim and ack adds row
  versions to it, and on a 2-core machine polling it every 50 ms from the start kept PostgreSQL
  busy for much of a core (--strict-poll does exactly that, for comparison). After SIGTERM,
  LLEN of the Redis queue must equal M.
- seed-style loop: the old poller's way. It SELECTs the unprocessed rows, then for each row does
  one Celery send_task and one committed UPDATE. It is slow, so by default it runs on
  min(M, 10,000) of the M seeded rows.
- database-only limit: N processes doing the store's claim + ack loop, with no publishing.
- broker-only limit: N processes publishing fabricated rows through RedisBatchPublisher.publish in
  batches of 500 (Celery builds each message, one LPUSH per batch). Then the same messages, already
  built, go out again with plain LPUSHes of 500.

Each measurement that touches PostgreSQL gets a schema of its own (bench_<random>), seeded with
COPY and dropped afterwards. Redis uses a database of its own, flushed before and after each
measurement.

How the columns are measured:

- CPU is user + system time of the client processes. It is the RUSAGE_CHILDREN delta around the
  pool start subprocess, whose supervisor waits for its pollers and coordinator so their time
  rolls up. For the other rows it is the delta around their worker processes. It includes
  interpreter start-up and imports. The PostgreSQL and Redis servers' own CPU is not counted.
- Peak RSS is for the largest single process, not a sum over processes. For pool it is the
  largest poller; the supervisor and the coordinator are listed below the table. It is VmHWM from
  /proc, sampled every second and once more right before SIGTERM. ru_maxrss cannot be used: on
  Linux a child keeps its parent's high-water mark across (v)fork + exec, so RUSAGE_CHILDREN,
  or wait4() on the pool start subprocess, reports at least this script's own peak for every
  measurement. That value is still written to bench.csv as ru_maxrss_mib, for comparison.

Results: a table on stdout, plus bench.csv and bench.png in --out (default loadtest/results/).
Exit code: 0 if every measurement passed its checks, 1 if one failed, 2 if a service or
matplotlib is missing.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib.util
import itertools
import math
import multiprocessing
import os
import platform
import queue
import re
import resource
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import click

DEFAULT_PG = "postgresql://root@127.0.0.1:5432/test"
DEFAULT_REDIS = "redis://127.0.0.1:6379/13"
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
QUEUE = "celery"
PREBUILT_KEY = "bench:prebuilt"
TASK = "ingest_and_score_signal"
POLL_EVERY = 0.05
STARTED_LINE = re.compile(r"started (\S+) \(pid (\d+)\)")
SEED_CHUNK = 20_000
LEASE_SECONDS = 60.0
SEED_STYLE_DEFAULT_CAP = 10_000

POOL = "pool start"
SEED_STYLE = "seed-style loop"
DB_ONLY = "database-only (claim+ack)"
HOSTS = "pool start, several hosts"
BROKER_PUBLISH = "broker-only (RedisBatchPublisher)"
BROKER_LPUSH = "broker-only (LPUSH prebuilt)"


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}{'es' if noun.endswith('s') else 's'}"


def note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- results -----------------------------------------------------------------------------------
@dataclass
class Result:
    what: str
    workers: int
    rows: int
    seconds: float | None = None
    cpu_seconds: float | None = None
    peak_rss_mib: float | None = None
    ok: bool = True
    note: str = ""
    startup_cpu_seconds: float | None = None
    poll_note: str = ""
    rss_note: str = ""
    ru_maxrss_mib: float | None = None
    server_cpu_seconds: float | None = None
    window_cpu_seconds: float | None = None  # pool: its processes' CPU from ready to drained

    @property
    def rate(self) -> float | None:
        return self.rows / self.seconds if self.ok and self.seconds else None

    @property
    def cpu_per_10k(self) -> float | None:
        if self.cpu_seconds is None or not self.rows:
            return None
        return self.cpu_seconds / (self.rows / 10_000)

    @property
    def server_cpu_per_10k(self) -> float | None:
        if self.server_cpu_seconds is None or not self.rows:
            return None
        return self.server_cpu_seconds / (self.rows / 10_000)

    def fail(self, reason: str) -> None:
        self.ok = False
        self.add_note(reason)

    def add_note(self, text: str) -> None:
        self.note = f"{self.note}; {text}" if self.note else text

    @property
    def label(self) -> str:
        return f"{self.what} x{self.workers}"


def cpu_seconds(usage: resource.struct_rusage) -> float:
    return usage.ru_utime + usage.ru_stime


SERVER_COMMANDS = ("postgres", "redis-server")


def server_cpu() -> float | None:
    """CPU seconds used so far by the local PostgreSQL and Redis servers, from /proc.

    Every process of theirs counts with its own time plus that of its reaped children, so a
    backend that exits between two readings still counts: the postmaster has reaped it."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return None
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as handle:
                stat = handle.read()
        except OSError:
            continue  # gone between listing and reading
        command = stat[stat.index("(") + 1:stat.rindex(")")]
        if command not in SERVER_COMMANDS:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        total += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    return total / ticks


# --- database helpers --------------------------------------------------------------------------
class Retries:
    """Counts database retries, so a measurement that lived through a PostgreSQL restart says so."""

    def __init__(self) -> None:
        self.count = 0


def retry_db(action: Callable[[], Any], what: str, retries: Retries | None = None,
             timeout: float = 90.0) -> Any:
    """Run a database action. If PostgreSQL is briefly restarted (CI may do that), retry it."""
    import psycopg
    from sqlalchemy.exc import OperationalError

    deadline = time.monotonic() + timeout
    delay = 0.2
    while True:
        try:
            return action()
        except (psycopg.OperationalError, OperationalError) as exc:
            if time.monotonic() + delay > deadline:
                raise
            if retries is not None:
                retries.count += 1
            first = str(getattr(exc, "orig", None) or exc).strip().splitlines()
            note(f"  {what}: database error, retrying: {first[0] if first else type(exc).__name__}")
            time.sleep(delay)
            delay = min(delay * 2, 2.0)


def execute(url: str, sql: str) -> Any:
    """Run one statement in autocommit mode (VACUUM needs that); returns the first row, if any."""
    import psycopg

    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        cursor = conn.execute(sql)
        return cursor.fetchone() if cursor.description else None


def with_search_path(pg: str, schema: str) -> str:
    separator = "&" if "?" in pg else "?"
    return f"{pg}{separator}options={quote(f'-csearch_path={schema}')}"


@contextlib.contextmanager
def fresh_schema(pg: str) -> Iterator[str]:
    """A database URL whose search_path is a new schema; the schema is dropped afterwards."""
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    retry_db(lambda: execute(pg, f'CREATE SCHEMA "{schema}"'), "create schema")
    try:
        yield with_search_path(pg, schema)
    finally:
        retry_db(lambda: execute(pg, f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'), "drop schema")


def make_settings(db_url: str | None, broker_url: str, batch_size: int = 500) -> Any:
    from pool.config import load_settings

    # environ={}: the caller's PULSE_* variables must not leak into a measurement.
    return load_settings(environ={}, overrides={"db_url": db_url, "broker_url": broker_url,
                                                "batch_size": batch_size})


def seed_rows(db_url: str, broker_url: str, rows: int, label: str) -> None:
    """Create and prepare `signals` in the schema and COPY `rows` synthetic signals into it."""
    from pool.seeding import generate_signals
    from pool.store import open_store

    store = open_store(make_settings(db_url, broker_url))
    try:
        retry_db(store.init_schema, "init schema")
        source = generate_signals(rows, seed=1)
        with click.progressbar(length=rows, label=f"  seeding {rows:,} rows for {label}",
                               file=sys.stderr) as bar:
            left = rows
            while left:
                chunk = list(itertools.islice(source, min(SEED_CHUNK, left)))
                # A failed COPY rolls back its whole transaction, so retrying the chunk is safe.
                retry_db(lambda chunk=chunk: store.insert_signals(chunk), "seed")
                left -= len(chunk)
                bar.update(len(chunk))
    finally:
        store.close()
    # The same starting point for every measurement: statistics in place, hint bits set, and no
    # checkpoint of the seeding's WAL landing in the middle of the timed part.
    retry_db(lambda: execute(db_url, "VACUUM ANALYZE signals"), "vacuum")
    with contextlib.suppress(Exception):
        execute(db_url, "CHECKPOINT")  # needs superuser or pg_checkpoint; optional


class UnprocessedCounter:
    """`SELECT count(*) FROM signals WHERE processed = 0` on one connection, reconnecting if needed."""

    SQL = "SELECT count(*) FROM signals WHERE processed = 0"

    def __init__(self, db_url: str) -> None:
        self.db_url = db_url
        self.conn: Any = None
        self.retries = Retries()
        self.queries = 0
        self.query_seconds = 0.0

    def _count(self) -> int:
        import psycopg

        if self.conn is None or self.conn.closed:
            self.conn = psycopg.connect(self.db_url, autocommit=True, connect_timeout=10)
        try:
            return int(self.conn.execute(self.SQL).fetchone()[0])
        except psycopg.OperationalError:
            with contextlib.suppress(Exception):
                self.conn.close()
            self.conn = None
            raise

    def count(self) -> int:
        started = time.perf_counter()
        value = retry_db(self._count, "count", self.retries)
        self.queries += 1
        self.query_seconds += time.perf_counter() - started
        return value

    def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.close()


# --- redis helpers -----------------------------------------------------------------------------
def redis_client(url: str) -> Any:
    import redis

    return redis.Redis.from_url(url, socket_timeout=30, socket_connect_timeout=5)


def flush_redis(url: str) -> None:
    client = redis_client(url)
    try:
        client.flushdb()
    finally:
        client.close()


def queue_length(url: str, key: str = QUEUE) -> int:
    client = redis_client(url)
    try:
        return int(client.llen(key))
    finally:
        client.close()


def check_queue(result: Result, url: str, expected: int) -> None:
    length = queue_length(url)
    if length != expected:
        result.fail(f"LLEN {QUEUE} = {length:,}, expected {expected:,}")


# --- pool end to end ---------------------------------------------------------------------------
def process_table() -> tuple[dict[int, int], dict[int, int]]:
    """pid -> parent pid, and pid -> CPU clock ticks (utime stime cutime cstime), from /proc."""
    parents: dict[int, int] = {}
    ticks: dict[int, int] = {}
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    data = handle.read()
            except OSError:
                continue
            fields = data[data.rindex(")") + 2:].split()
            parents[int(entry)] = int(fields[1])
            ticks[int(entry)] = sum(int(value) for value in fields[11:15])
    return parents, ticks


def process_tree(root: int, parents: dict[int, int]) -> set[int]:
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in tree:
                tree.add(pid)
                frontier.append(pid)
    return tree


def tree_cpu_seconds(root: int) -> float | None:
    """CPU used so far by `root` and its live descendants (children they reaped included)."""
    parents, ticks = process_table()
    if root not in ticks:
        return None
    return sum(ticks.get(pid, 0) for pid in process_tree(root, parents)) / os.sysconf("SC_CLK_TCK")


def peak_rss_kib(pid: int | str = "self") -> int | None:
    """VmHWM: the peak resident set of the process since its exec.

    ru_maxrss is no use for this: across (v)fork + exec a child keeps its parent's high-water
    mark, so every child of this script would report at least this script's own peak."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def sample_tree_rss(root: int, peaks: dict[int, int]) -> None:
    """Record the VmHWM of every live process under `root` (VmHWM only grows, so the last sample of
    a process is its peak up to then)."""
    parents, _ticks = process_table()
    for pid in process_tree(root, parents):
        hwm = peak_rss_kib(pid)
        if hwm is not None:
            peaks[pid] = max(peaks.get(pid, 0), hwm)


def reap(proc: subprocess.Popen, timeout: float) -> resource.struct_rusage | None:
    """wait4() the subprocess (its rusage covers its whole reaped process tree); None on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return usage
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.05)


def has_exited(proc: subprocess.Popen) -> bool:
    """True once the subprocess has exited; it is left unreaped so wait4() still gets its rusage."""
    if proc.returncode is not None:
        return True
    info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    return info is not None


def pool_env(args: argparse.Namespace, db_url: str) -> dict[str, str]:
    """The environment `pool start` runs with here: this one's, minus any PULSE_* / PROMETHEUS_*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PULSE_", "PROMETHEUS_"))}
    env.update(PULSE_DB_URL=db_url, PULSE_BROKER_URL=args.redis, PULSE_LOG_LEVEL="INFO",
               PULSE_BACKPRESSURE_HIGH="0", PULSE_BATCH_SIZE=str(args.batch_size))
    return env


def measure_pool(args: argparse.Namespace, workers: int) -> Result:
    rows = args.rows
    result = Result(POOL, workers, rows)
    with fresh_schema(args.pg) as db_url:
        seed_rows(db_url, args.redis, rows, f"pool start --workers {workers}")
        flush_redis(args.redis)
        env = pool_env(args, db_url)
        command = [sys.executable, "-m", "pool", "start", "--workers", str(workers), "--metrics-port", "0"]
        counter = UnprocessedCounter(db_url)
        tail: deque[str] = deque(maxlen=40)
        names: dict[int, str] = {}  # from the supervisor's "started poller-3 (pid 1234)" lines
        peaks: dict[int, int] = {}
        ready = threading.Event()
        note(f"  running {' '.join(command[1:])}")
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)

        def read_stderr() -> None:
            assert proc.stderr is not None
            for line in proc.stderr:
                tail.append(line.rstrip("\n"))
                if started := STARTED_LINE.search(line):
                    names[int(started[2])] = started[1]
                if "ready:" in line:
                    ready.set()

        reader = threading.Thread(target=read_stderr, daemon=True)
        reader.start()
        usage = None
        left_at_ready = None
        llen_polls = 0
        watch = redis_client(args.redis)
        try:
            launched = time.monotonic()
            while not ready.wait(0.05):
                if has_exited(proc):
                    raise RuntimeError("pool start exited before it was ready")
                if time.monotonic() - launched > 120:
                    raise RuntimeError("pool start was not ready within 120 s")
            ready_at = time.monotonic()
            server_before = server_cpu()
            result.startup_cpu_seconds = tree_cpu_seconds(proc.pid)
            timeout = 120 + rows / 200
            next_poll = ready_at
            last_count = -math.inf
            left = rows
            for tick in itertools.count():
                if tick % 20 == 0:
                    sample_tree_rss(proc.pid, peaks)
                now = time.monotonic()
                # count(*) scans the whole table (every claim and ack leaves a new row version), and
                # every 50 ms that would keep a good part of a core busy. So unless --strict-poll is
                # given, it runs every 50 ms only once the queue holds all M messages, and once a
                # second before that. The stop condition is the same either way.
                due = args.strict_poll or now - last_count >= 1.0
                if not due:
                    llen_polls += 1
                    due = watch.llen(QUEUE) >= rows
                if due:
                    last_count = now
                    left = counter.count()
                    if left_at_ready is None:
                        left_at_ready = left
                    if left == 0:
                        break
                if has_exited(proc):
                    raise RuntimeError(f"pool start exited with {left:,} rows unprocessed")
                if time.monotonic() - ready_at > timeout:
                    raise RuntimeError(f"{left:,} rows still unprocessed after {timeout:.0f} s")
                next_poll += POLL_EVERY
                time.sleep(max(0.0, next_poll - time.monotonic()))
            result.seconds = time.monotonic() - ready_at
            server_after = server_cpu()
            if server_before is not None and server_after is not None:
                result.server_cpu_seconds = server_after - server_before
            drained_cpu = tree_cpu_seconds(proc.pid)
            if drained_cpu is not None and result.startup_cpu_seconds is not None:
                result.window_cpu_seconds = drained_cpu - result.startup_cpu_seconds
            sample_tree_rss(proc.pid, peaks)
            os.kill(proc.pid, signal.SIGTERM)
            usage = reap(proc, timeout=60)
            if usage is None:
                result.fail("pool start did not stop within 60 s of SIGTERM; killed")
        except Exception as exc:  # noqa: BLE001 - reported as a FAIL row; the other rows still run
            result.fail(str(exc))
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                usage = usage or reap(proc, timeout=30)
            reader.join(timeout=5)
            counter.close()
            watch.close()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        result.cpu_seconds = cpu_seconds(after) - cpu_seconds(before)
        if usage is not None:
            result.ru_maxrss_mib = usage.ru_maxrss / 1024
        pollers = [kib for pid, kib in peaks.items() if names.get(pid, "").startswith("poller-")]
        if pollers:
            result.peak_rss_mib = max(pollers) / 1024
            others: dict[str, int] = {"supervisor": peaks.get(proc.pid, 0)}
            for pid, kib in peaks.items():
                if pid != proc.pid and not names.get(pid, "").startswith("poller-"):
                    # Unnamed: multiprocessing's resource tracker, which the supervisor starts.
                    name = names.get(pid, "other")
                    others[name] = max(others.get(name, 0), kib)
            rest = ", ".join(f"{name} {kib / 1024:.0f}" for name, kib in sorted(others.items()))
            result.rss_note = (f"peak RSS MiB: pollers {min(pollers) / 1024:.0f}-{max(pollers) / 1024:.0f},"
                               f" {rest}")
        elif peaks:  # no "started poller-N (pid ...)" lines to tell the processes apart
            result.peak_rss_mib = max(peaks.values()) / 1024
            result.rss_note = "peak RSS: largest process of the pool start tree (pollers not identified)"
        if proc.returncode != 0:
            result.fail(f"pool start exit code {proc.returncode}")
        if result.seconds is not None:
            check_queue(result, args.redis, rows)
        if not result.ok:
            note("  pool start output (last lines):\n    " + "\n    ".join(tail))
        if left_at_ready is not None and left_at_ready < rows:
            done_before = rows - left_at_ready
            result.add_note(f"{done_before:,} rows ({done_before / rows:.1%}) already relayed at 'ready:'")
        if counter.retries.count:
            result.add_note(f"{counter.retries.count} database retries (timing disturbed)")
        if counter.queries:
            each = 1000 * counter.query_seconds / counter.queries
            result.poll_note = f"{counter.queries} count(*) polls at {each:.1f} ms each"
            if not args.strict_poll:
                result.poll_note += f", {llen_polls} LLEN polls"
    flush_redis(args.redis)
    return result


def measure_instances(args: argparse.Namespace, instances: int, workers: int) -> Result:
    """`instances` separate `pool start --workers W --host-id bench-K` on one table, as several
    hosts would run it: they share the shards through leases in the database."""
    rows = args.rows
    result = Result(HOSTS, instances * workers, rows)
    with fresh_schema(args.pg) as db_url:
        seed_rows(db_url, args.redis, rows, f"{instances} x pool start --workers {workers}")
        flush_redis(args.redis)
        env = pool_env(args, db_url)
        procs, readies, tails = [], [], []
        for k in range(instances):
            command = [sys.executable, "-m", "pool", "start", "--workers", str(workers),
                       "--metrics-port", "0", "--host-id", f"bench-{k}"]
            proc = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, text=True, start_new_session=True)
            ready, tail = threading.Event(), deque(maxlen=20)

            def read(proc: subprocess.Popen = proc, ready: threading.Event = ready,
                     tail: deque = tail) -> None:
                assert proc.stderr is not None
                for line in proc.stderr:
                    tail.append(line.rstrip("\n"))
                    if "ready:" in line:
                        ready.set()

            threading.Thread(target=read, daemon=True).start()
            procs.append(proc)
            readies.append(ready)
            tails.append(tail)
        note(f"  running {instances} x pool start --workers {workers} (host ids bench-0..{instances - 1})")
        counter = UnprocessedCounter(db_url)
        watch = redis_client(args.redis)
        try:
            deadline = time.monotonic() + 120
            for ready in readies:
                if not ready.wait(max(0.0, deadline - time.monotonic())):
                    raise RuntimeError("not every pool start got ready within 120 s")
            started = time.monotonic()
            server_before = server_cpu()
            timeout = 120 + rows / 200
            while watch.llen(QUEUE) < rows or counter.count():
                if any(has_exited(proc) for proc in procs):
                    raise RuntimeError("a pool start exited during the drain")
                if time.monotonic() - started > timeout:
                    raise RuntimeError(f"rows still unprocessed after {timeout:.0f} s")
                time.sleep(POLL_EVERY)
            result.seconds = time.monotonic() - started
            server_after = server_cpu()
            if server_before is not None and server_after is not None:
                result.server_cpu_seconds = server_after - server_before
            for proc in procs:
                os.kill(proc.pid, signal.SIGTERM)
            for proc in procs:
                if reap(proc, timeout=60) is None:
                    result.fail("a pool start did not stop within 60 s of SIGTERM")
        except Exception as exc:  # noqa: BLE001 - reported as a FAIL row; the other rows still run
            result.fail(str(exc))
        finally:
            for proc in procs:
                if proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    reap(proc, timeout=30)
            counter.close()
            watch.close()
        codes = [proc.returncode for proc in procs]
        if any(code != 0 for code in codes):
            result.fail(f"pool start exit codes {codes}")
            note("  output of the first pool start (last lines):\n    " + "\n    ".join(tails[0]))
        if result.seconds is not None:
            check_queue(result, args.redis, rows)
        result.add_note(f"{instances} hosts x {workers} workers")
    flush_redis(args.redis)
    return result


# --- worker processes for the seed-style loop and the limits -----------------------------------
# Each worker is spawned, sets itself up (imports, connections, data), says "ready", waits for
# "go", runs its job and reports when it finished. The clock runs from "go" to the last finish.
Job = Callable[[], tuple[int, int]]  # -> (rows done, database retries)


def _worker_entry(setup: Callable[..., Job], setup_args: tuple, go: Any, reports: Any) -> None:
    try:
        job = setup(*setup_args)
        reports.put(("ready", os.getpid()))
        go.wait()
        rows, retries = job()
        finished = time.monotonic()
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        reports.put(("done", finished, rows, peak_rss_kib() or 0, retries, maxrss))
    except BaseException as exc:  # noqa: BLE001 - the parent must hear about any failure
        reports.put(("error", os.getpid(), f"{type(exc).__name__}: {exc}"))


@dataclass
class WorkerRun:
    seconds: float
    rows: int
    cpu_seconds: float
    peak_rss_mib: float
    retries: int
    ru_maxrss_mib: float
    server_cpu_seconds: float | None


def run_workers(setup: Callable[..., Job], per_worker: list[tuple], timeout: float) -> WorkerRun:
    ctx = multiprocessing.get_context("spawn")
    reports = ctx.Queue()
    go = ctx.Event()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    procs = [ctx.Process(target=_worker_entry, args=(setup, a, go, reports), daemon=True) for a in per_worker]
    for proc in procs:
        proc.start()

    def next_report(deadline: float) -> tuple:
        while True:
            try:
                report = reports.get(timeout=0.5)
                break
            except queue.Empty:
                crashed = [p for p in procs if p.exitcode not in (None, 0)]
                if crashed:
                    raise RuntimeError(f"worker {crashed[0].pid} exited with code {crashed[0].exitcode}"
                                       " before reporting") from None
                if time.monotonic() > deadline:
                    raise RuntimeError("workers did not report in time") from None
        if report[0] == "error":
            raise RuntimeError(f"worker {report[1]}: {report[2]}")
        return report

    try:
        deadline = time.monotonic() + 120
        for _ in procs:
            next_report(deadline)
        server_before = server_cpu()
        started = time.monotonic()
        go.set()
        deadline = started + timeout
        done = [next_report(deadline) for _ in procs]
        server_after = server_cpu()
    except BaseException:
        for proc in procs:
            proc.kill()
        raise
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.exitcode is None:
                proc.kill()
                proc.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return WorkerRun(
        seconds=max(report[1] for report in done) - started,
        rows=sum(report[2] for report in done),
        cpu_seconds=cpu_seconds(after) - cpu_seconds(before),
        peak_rss_mib=max(report[3] for report in done) / 1024,
        retries=sum(report[4] for report in done),
        ru_maxrss_mib=max(report[5] for report in done) / 1024,
        server_cpu_seconds=None if server_before is None or server_after is None
        else server_after - server_before,
    )


def fill(result: Result, run: WorkerRun, expected_rows: int) -> None:
    result.seconds = run.seconds
    result.cpu_seconds = run.cpu_seconds
    result.peak_rss_mib = run.peak_rss_mib
    result.ru_maxrss_mib = run.ru_maxrss_mib
    result.server_cpu_seconds = run.server_cpu_seconds
    if run.rows != expected_rows:
        result.fail(f"workers did {run.rows:,} rows, expected {expected_rows:,}")
    if run.retries:
        result.add_note(f"{run.retries} database retries (timing disturbed)")


def seed_style_setup(db_url: str, broker_url: str, limit: int) -> Job:
    """The old poller: SELECT the unprocessed rows, then per row one send_task and one committed UPDATE."""
    from sqlalchemy import text

    from pool.broker import create_celery_app
    from pool.payload import build_payload
    from pool.store import ClaimedRow, create_db_engine

    settings = make_settings(db_url, broker_url)
    app = create_celery_app(settings)
    engine = create_db_engine(db_url)
    retry_db(lambda: engine.connect().close(), "connect")
    select = text("SELECT id, name, value, source, timestamp FROM signals"
                  " WHERE processed = 0 ORDER BY id LIMIT :limit")
    update = text("UPDATE signals SET processed = 1 WHERE id = :id")

    def mark(row_id: int) -> None:
        with engine.begin() as conn:
            conn.execute(update, {"id": row_id})

    def job() -> tuple[int, int]:
        retries = Retries()

        def select_rows() -> list:
            with engine.connect() as conn:
                return conn.execute(select, {"limit": limit}).all()

        rows = retry_db(select_rows, "select", retries)
        for row_id, name, value, source, timestamp in rows:
            payload = build_payload(ClaimedRow(row_id, name, value, source, timestamp, 0))
            app.send_task(TASK, args=[payload], task_id=f"signal-{row_id}")
            retry_db(lambda row_id=row_id: mark(row_id), "update", retries)
        engine.dispose()
        return len(rows), retries.count

    return job


def db_only_setup(db_url: str, shard_count: int, shards: list[int], batch_size: int) -> Job:
    """The store's claim + ack loop over a poller's share of the shards, as a poller runs it,
    minus publishing (and minus shard leases: the share is fixed here)."""
    from pool.store import open_store

    store = open_store(make_settings(db_url, "redis://unused", batch_size))
    retry_db(lambda: store.engine.connect().close(), "connect")
    owner = f"bench:{os.getpid()}"

    def job() -> tuple[int, int]:
        retries = Retries()
        done = 0
        while True:
            claim = retry_db(lambda: store.claim(owner, shard_count, shards, batch_size, LEASE_SECONDS),
                             "claim", retries)
            if not claim.rows:
                break
            ids = [row.id for row in claim.rows]
            done += retry_db(lambda claim=claim, ids=ids: store.ack(claim.lease, ids), "ack", retries)
        store.close()
        return done, retries.count

    return job


def publish_setup(broker_url: str, first_id: int, step: int, count: int, batch_size: int) -> Job:
    """RedisBatchPublisher.publish on fabricated rows, in batches as a poller publishes them."""
    from pool.redis_batch import RedisBatchPublisher
    from pool.seeding import generate_signals
    from pool.store import ClaimedRow

    signals = generate_signals(count, seed=first_id)
    ids = range(first_id, first_id + step * count, step)
    rows = [ClaimedRow(i, s["name"], s["value"], s["source"], s["timestamp"], 0)
            for i, s in zip(ids, signals, strict=True)]
    publisher = RedisBatchPublisher(make_settings(None, broker_url, batch_size))
    publisher._get_producer()  # connect before the clock starts

    def job() -> tuple[int, int]:
        sent = 0
        for start in range(0, len(rows), batch_size):
            outcome = publisher.publish(rows[start:start + batch_size])
            if outcome.unsent or outcome.rejected:
                raise RuntimeError(f"publish failed: {outcome.broker_error or outcome.rejected}")
            sent += len(outcome.accepted)
        publisher.close()
        return sent, 0

    return job


def lpush_setup(redis_url: str, start: int, stop: int, batch_size: int) -> Job:
    """Plain LPUSHes of already-built Celery messages, one per batch: the broker path's ceiling."""
    client = redis_client(redis_url)
    messages = client.lrange(PREBUILT_KEY, start, stop - 1)

    def job() -> tuple[int, int]:
        for first in range(0, len(messages), batch_size):
            client.lpush(QUEUE, *messages[first:first + batch_size])
        client.close()
        return len(messages), 0

    return job


def worker_timeout(rows: int) -> float:
    return 120 + rows / 100


def measure_seed_style(args: argparse.Namespace) -> Result:
    sample = args.seed_style_rows
    result = Result(SEED_STYLE, 1, sample)
    with fresh_schema(args.pg) as db_url:
        seed_rows(db_url, args.redis, args.rows, SEED_STYLE)
        flush_redis(args.redis)
        note(f"  running the seed-style loop on {sample:,} of the {args.rows:,} rows")
        run = run_workers(seed_style_setup, [(db_url, args.redis, sample)], worker_timeout(sample * 5))
        fill(result, run, sample)
        check_queue(result, args.redis, sample)
        processed = retry_db(lambda: execute(db_url, "SELECT count(*) FROM signals WHERE processed = 1"),
                             "count")[0]
        if processed != sample:
            result.fail(f"{processed:,} rows processed, expected {sample:,}")
    if sample < args.rows:
        result.add_note(f"a sample of {sample:,} rows (the table holds {args.rows:,})")
    flush_redis(args.redis)
    return result


def measure_db_only(args: argparse.Namespace, workers: int) -> Result:
    result = Result(DB_ONLY, workers, args.rows)
    with fresh_schema(args.pg) as db_url:
        seed_rows(db_url, args.redis, args.rows, DB_ONLY)
        note(f"  running claim + ack in {plural(workers, 'process')}")
        from pool.config import Settings

        count = Settings().shards  # as `pool init-db` splits the table
        per_worker = [(db_url, count, [s for s in range(count) if s % workers == k], args.batch_size)
                      for k in range(workers)]
        run = run_workers(db_only_setup, per_worker, worker_timeout(args.rows))
        fill(result, run, args.rows)
        left = retry_db(lambda: execute(db_url, UnprocessedCounter.SQL), "count")[0]
        if left:
            result.fail(f"{left:,} rows left unprocessed")
    return result


def measure_broker_only(args: argparse.Namespace, workers: int) -> list[Result]:
    rows = args.rows
    publish = Result(BROKER_PUBLISH, workers, rows)
    lpush = Result(BROKER_LPUSH, workers, rows)
    flush_redis(args.redis)
    try:
        note(f"  publishing {rows:,} fabricated rows from {plural(workers, 'process')} (no database)")
        counts = [len(range(k + 1, rows + 1, workers)) for k in range(workers)]
        per_worker = [(args.redis, k + 1, workers, counts[k], args.batch_size) for k in range(workers)]
        fill(publish, run_workers(publish_setup, per_worker, worker_timeout(rows)), rows)
        check_queue(publish, args.redis, rows)
        if not publish.ok:
            lpush.fail("skipped: the publish run did not leave the messages to reuse")
            return [publish, lpush]
        client = redis_client(args.redis)
        try:
            client.rename(QUEUE, PREBUILT_KEY)
        finally:
            client.close()
        note(f"  pushing the same {rows:,} messages again with plain LPUSH from {plural(workers, 'process')}")
        bounds = [rows * k // workers for k in range(workers + 1)]
        per_worker = [(args.redis, bounds[k], bounds[k + 1], args.batch_size) for k in range(workers)]
        fill(lpush, run_workers(lpush_setup, per_worker, worker_timeout(rows)), rows)
        check_queue(lpush, args.redis, rows)
    finally:
        flush_redis(args.redis)
    return [publish, lpush]


def guarded(what: str, workers: int, rows: int, measure: Callable[[], Any]) -> list[Result]:
    """Run one measurement; if it raises, the table gets a FAIL row instead and the run goes on."""
    started = time.monotonic()
    try:
        outcome = measure()
    except Exception as exc:  # noqa: BLE001 - one broken measurement must not hide the others
        note(f"  {what}: FAILED: {type(exc).__name__}: {exc}")
        failed = Result(what, workers, rows)
        failed.fail(f"{type(exc).__name__}: {exc}".splitlines()[0])
        return [failed]
    results = outcome if isinstance(outcome, list) else [outcome]
    for result in results:
        rate = f"{result.rate:,.0f} rows/s" if result.rate else "FAIL"
        note(f"  {result.label}: {rate} (measurement took {time.monotonic() - started:.0f} s in all)")
    return results


# --- output ------------------------------------------------------------------------------------
COLUMNS = ("what", "workers", "rows", "seconds", "rows/s", "CPU s per 10k rows", "server CPU s per 10k",
           "peak RSS MiB*", "check")


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def per_row_us(seconds: float, result: Result) -> str:
    return f"{seconds / result.rows * 1e6:.1f}"


def table_lines(results: list[Result]) -> list[str]:
    rows = [(r.what, str(r.workers), f"{r.rows:,}", fmt(r.seconds, ".2f"), fmt(r.rate, ",.0f"),
             fmt(r.cpu_per_10k, ".2f"), fmt(r.server_cpu_per_10k, ".2f"), fmt(r.peak_rss_mib, ".0f"),
             "ok" if r.ok else "FAIL") for r in results]
    widths = [max(len(COLUMNS[i]), *(len(row[i]) for row in rows)) for i in range(len(COLUMNS))]

    def line(cells: tuple[str, ...]) -> str:
        padded = (c.ljust(w) if i in (0, len(COLUMNS) - 1) else c.rjust(w)
                  for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
        return "  ".join(padded).rstrip()

    out = [line(COLUMNS), "  ".join("-" * w for w in widths)]
    out.extend(line(row) for row in rows)
    return out


def ratio_lines(results: list[Result]) -> list[str]:
    pools = [r for r in results if r.what == POOL]
    if not pools:
        return []
    top = max(pools, key=lambda r: r.workers)
    name = f"pool({plural(top.workers, 'worker')})"
    lines = []
    for what, label in ((SEED_STYLE, "seed-style"), (DB_ONLY, "database-only"),
                        (BROKER_PUBLISH, "broker-only publish")):
        other = next((r for r in results if r.what == what), None)
        if top.rate and other is not None and other.rate:
            lines.append(f"ratio {name} ÷ {label}: {top.rate / other.rate:.2f}×"
                         f"  ({top.rate:,.0f} vs {other.rate:,.0f} rows/s)")
        else:
            lines.append(f"ratio {name} ÷ {label}: n/a (FAIL)")
    return lines


def write_csv(path: Path, results: list[Result]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["what", "workers", "rows", "seconds", "rows_per_s", "cpu_s_per_10k_rows",
                         "server_cpu_s_per_10k_rows", "peak_rss_mib", "ru_maxrss_mib", "startup_cpu_s", "ok",
                         "note"])
        for r in results:
            writer.writerow([
                r.what, r.workers, r.rows, fmt(r.seconds, ".3f"), fmt(r.rate, ".1f"),
                fmt(r.cpu_per_10k, ".3f"), fmt(r.server_cpu_per_10k, ".3f"), fmt(r.peak_rss_mib, ".1f"),
                fmt(r.ru_maxrss_mib, ".1f"),
                fmt(r.startup_cpu_seconds, ".2f"),
                "ok" if r.ok else "FAIL", r.note,
            ])


def write_chart(path: Path, results: list[Result], rows: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {POOL: "#1f77b4", HOSTS: "#17becf", SEED_STYLE: "#d62728", DB_ONLY: "#2ca02c",
               BROKER_PUBLISH: "#ff7f0e", BROKER_LPUSH: "#9467bd"}
    labels = [f"{r.what}, {plural(r.workers, 'worker' if r.what in (POOL, HOSTS) else 'process')}"
              for r in results]
    rates = [r.rate or 0.0 for r in results]
    positive = [rate for rate in rates if rate > 0] or [10.0]
    left, right = 10 ** math.floor(math.log10(min(positive))), max(positive) * 4
    fig, ax = plt.subplots(figsize=(10, 0.55 * len(results) + 1.8))
    positions = list(range(len(results)))[::-1]
    bars = ax.barh(positions, [rate if rate > 0 else left for rate in rates], left=0,
                   color=[colours.get(r.what, "grey") if r.ok else "lightgrey" for r in results])
    ax.set_yticks(positions, labels)
    ax.set_xscale("log")
    ax.set_xlim(left=left, right=right)
    ax.set_xlabel("rows/s (log scale)")
    ax.set_title(f"pool benchmark: {rows:,} rows, {os.cpu_count()} CPU cores")
    for bar, rate, result in zip(bars, rates, results, strict=True):
        text = f"{rate:,.0f}" if result.ok else "FAIL"
        ax.text(max(rate, left) * 1.05, bar.get_y() + bar.get_height() / 2, text, va="center", fontsize=9)
    ax.grid(axis="x", which="major", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- main --------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark pool against the seed-style loop and the database-/broker-only limits.")
    parser.add_argument("--rows", type=int, default=None, help="rows per measurement (default 100000)")
    parser.add_argument("--workers-list", default=None, help="pool worker counts (default 1,2,4,8)")
    parser.add_argument("--seed-style-rows", type=int, default=None,
                        help=f"rows the slow seed-style loop relays"
                             f" (default min(rows, {SEED_STYLE_DEFAULT_CAP}))")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--pg", default=DEFAULT_PG, help=f"PostgreSQL URL (default {DEFAULT_PG})")
    parser.add_argument("--redis", default=DEFAULT_REDIS,
                        help=f"Redis URL of a database this run may flush (default {DEFAULT_REDIS})")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for bench.csv and bench.png")
    parser.add_argument("--strict-poll", action="store_true",
                        help="run the count(*) completion poll every 50 ms from the start, not only once"
                             " the queue holds every message (more load on PostgreSQL while timing)")
    parser.add_argument("--instances", type=int, default=0,
                        help="also run this many `pool start` instances (hosts) on one table, splitting the"
                             " largest worker count between them (default: 0, skip)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 5000 rows, workers 1,2, seed-style on 1000 rows")
    args = parser.parse_args(argv)
    if args.quick:
        args.rows = args.rows or 5_000
        args.workers_list = args.workers_list or "1,2"
        args.seed_style_rows = args.seed_style_rows or min(args.rows, 1_000)
    args.rows = args.rows or 100_000
    args.workers_list = args.workers_list or "1,2,4,8"
    try:
        workers = sorted({int(part) for part in args.workers_list.split(",") if part.strip()})
    except ValueError:
        parser.error(f"--workers-list must be comma-separated integers, got {args.workers_list!r}")
    if not workers or workers[0] < 1 or workers[-1] > 256:
        parser.error("--workers-list needs worker counts between 1 and 256")
    args.workers = workers
    if args.rows < 1:
        parser.error("--rows must be at least 1")
    args.seed_style_rows = min(args.seed_style_rows or SEED_STYLE_DEFAULT_CAP, args.rows)
    if args.seed_style_rows < 1 or args.batch_size < 1:
        parser.error("--seed-style-rows and --batch-size must be at least 1")
    return args


def preflight(args: argparse.Namespace) -> str | None:
    """Everything a run needs, checked before minutes are spent; returns a problem or None."""
    if importlib.util.find_spec("matplotlib") is None:
        return "matplotlib is not installed: pip install -e '.[load]'"
    try:
        version = execute(args.pg, "SELECT current_setting('server_version')")[0]
    except Exception as exc:  # noqa: BLE001
        return f"PostgreSQL at {args.pg}: {str(exc).strip().splitlines()[0]}"
    try:
        client = redis_client(args.redis)
        try:
            keys = client.dbsize()
            redis_version = client.info("server")["redis_version"]
        finally:
            client.close()
    except Exception as exc:  # noqa: BLE001
        return f"Redis at {args.redis}: {exc}"
    if keys:
        note(f"warning: Redis database {args.redis} held {keys} keys; flushing it")
    args.versions = f"PostgreSQL {version}, Redis {redis_version}"
    return None


def main(argv: list[str] | None = None) -> int:
    with contextlib.suppress(AttributeError, ValueError):
        sys.stdout.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]
    args = parse_args(argv)
    problem = preflight(args)
    if problem:
        note(f"bench: {problem}")
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    limit_workers = max(args.workers)
    load_before = os.getloadavg()
    started = time.monotonic()
    note(f"bench: {args.rows:,} rows, pool with {','.join(map(str, args.workers))} workers, "
         f"limits with {limit_workers} processes; {args.versions}")
    results: list[Result] = []
    try:
        flush_redis(args.redis)
        for workers in args.workers:
            note(f"[pool start --workers {workers}]")
            results += guarded(POOL, workers, args.rows, lambda w=workers: measure_pool(args, w))
        if args.instances > 1:
            per_host = max(1, limit_workers // args.instances)
            note(f"[{args.instances} x pool start --workers {per_host}]")
            results += guarded(HOSTS, args.instances * per_host, args.rows,
                               lambda: measure_instances(args, args.instances, per_host))
        note(f"[{SEED_STYLE}]")
        results += guarded(SEED_STYLE, 1, args.seed_style_rows, lambda: measure_seed_style(args))
        note(f"[{DB_ONLY}]")
        results += guarded(DB_ONLY, limit_workers, args.rows, lambda: measure_db_only(args, limit_workers))
        note("[broker-only]")
        results += guarded(BROKER_PUBLISH, limit_workers, args.rows,
                           lambda: measure_broker_only(args, limit_workers))
    finally:
        with contextlib.suppress(Exception):
            flush_redis(args.redis)
    elapsed = time.monotonic() - started

    print()
    print(f"pool benchmark: {args.rows:,} rows per measurement, batch size {args.batch_size}, "
          f"{os.cpu_count()} CPU cores, Python {platform.python_version()}, {args.versions}")
    print(f"load average {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after; "
          f"whole run {elapsed:.0f} s")
    print()
    for line in table_lines(results):
        print(line)
    print()
    print("* peak RSS: of the largest single process, not the sum over processes: for pool the largest")
    print("  poller, for the others the largest worker (VmHWM; ru_maxrss would report this script's own")
    print("  peak, which children keep across fork + exec, see bench.csv ru_maxrss_mib).")
    print("  CPU: user+sys of the client processes (RUSAGE_CHILDREN delta), start-up included.")
    print("  server CPU: the local PostgreSQL and Redis processes over the timed window (from /proc,")
    print("  reaped backends included; for pool it includes this script's completion polls).")
    print("  pool seconds: from the 'ready:' line until count(*) WHERE processed = 0 is 0, polled every")
    print("  50 ms " + ("from the start (--strict-poll);" if args.strict_poll else
                        "once LLEN reaches the row count, every 1 s before (see --strict-poll);"))
    print("  the limits: from 'go' to the last worker's finish, set-up excluded.")
    for r in results:
        extra = []
        if r.what == POOL and r.startup_cpu_seconds is not None:
            extra.append(f"start-up CPU (launch to ready, all processes) {r.startup_cpu_seconds:.2f} s")
            if r.window_cpu_seconds is not None and r.server_cpu_seconds is not None:
                extra.append(f"CPU per row, ready to drained: pool {per_row_us(r.window_cpu_seconds, r)} µs,"
                             f" servers {per_row_us(r.server_cpu_seconds, r)} µs")
        if r.rss_note:
            extra.append(r.rss_note)
        if r.poll_note:
            extra.append(r.poll_note)
        if r.note:
            extra.append(("FAIL: " if not r.ok else "") + r.note)
        if extra:
            print(f"  {r.label}: " + "; ".join(extra))
    print()
    for line in ratio_lines(results):
        print(line)

    write_csv(args.out / "bench.csv", results)
    write_chart(args.out / "bench.png", results, args.rows)
    print()
    print(f"wrote {args.out / 'bench.csv'} and {args.out / 'bench.png'}")
    failed = [r for r in results if not r.ok]
    if failed:
        print(f"FAIL: {len(failed)} measurement(s) failed: " + ", ".join(r.label for r in failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
