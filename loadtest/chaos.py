"""Chaos run: `pool start` on PostgreSQL + Redis while pollers are SIGKILLed, Redis is stopped
and PostgreSQL is restarted. Checks that no signal was lost and prints what it measured.

    python loadtest/chaos.py --rows 50000 --workers 8

Rows are inserted at a steady rate while pool runs, so every fault lands under load. It uses
a fresh schema in PostgreSQL and a private redis-server (append-only file, so a stop keeps the
messages), restarts the machine's PostgreSQL cluster once, and cleans up after itself.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import quote

import psycopg
import redis

POISON_KINDS = ("nan", "inf", "-inf", "null name", "null value", "too large")
MAX_PAYLOAD = 4096


@dataclass
class ChaosConfig:
    rows: int = 50_000
    workers: int = 8
    batch_size: int = 200
    poison_ratio: float = 0.01
    lease_seconds: float = 3.0
    kill_every: tuple[float, float] = (1.0, 2.0)
    redis_stop_at: float = 3.0
    redis_stop_for: float = 5.0
    pg_restart_at: float = 12.0
    insert_seconds: float = 20.0
    pg: str = "postgresql://root@127.0.0.1:5432/test"
    timeout: float = 900.0
    seed: int = 1


@dataclass
class ChaosReport:
    rows: int
    good: int
    poison: int
    seconds: float = 0.0
    kills: int = 0
    processed_good: int = 0
    good_on_broker: int = 0
    messages: int = 0
    duplicates: int = 0
    duplicate_bound: int = 0
    dead_poison: int = 0
    poison_with_error: int = 0
    dead_and_processed: int = 0
    exit_code: int | None = None
    kill_recovery: list[float] = field(default_factory=list)
    redis_recovery: float | None = None
    pg_recovery: float | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        def fmt(value: float | None) -> str:
            return "n/a" if value is None else f"{value:.2f} s"

        kill = sorted(self.kill_recovery)
        kill_text = (f"median {kill[len(kill) // 2]:.2f} s, max {kill[-1]:.2f} s over {len(kill)} restarts"
                     if kill else "n/a")
        return [
            f"rows                         {self.rows} ({self.good} good, {self.poison} poison)",
            f"run time                     {self.seconds:.1f} s",
            f"pollers SIGKILLed            {self.kills}",
            f"good rows processed          {self.processed_good} / {self.good}",
            f"good task ids on broker      {self.good_on_broker} / {self.good}",
            f"messages on broker           {self.messages}",
            f"duplicate deliveries         {self.duplicates} (bound: kills x batch = {self.duplicate_bound})",
            f"poison rows dead             {self.dead_poison} / {self.poison}"
            f" ({self.poison_with_error} with their error)",
            f"rows dead and processed      {self.dead_and_processed}",
            f"recovery after poller kill   {kill_text} (kill -> restarted poller ready)",
            f"recovery after Redis stop    {fmt(self.redis_recovery)} (Redis back -> first ack)",
            f"recovery after PG restart    {fmt(self.pg_recovery)} (PostgreSQL back -> first ack)",
            f"pool start exit code         {self.exit_code}",
            "RESULT " + ("ok" if self.ok else "FAILED: " + "; ".join(self.problems)),
        ]


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        return sock.getsockname()[1]


class PrivateRedis:
    """A redis-server of this run's own, with an append-only file so a stop loses nothing."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="pool-chaos-redis-")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--appendfsync", "everysec", "--dir", self.dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 30
        while True:
            try:
                if client.ping():
                    return
            except redis.RedisError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            # SHUTDOWN writes the append-only file before exiting; connections are refused after.
            subprocess.run(["redis-cli", "-p", str(self.port), "shutdown"], capture_output=True)
            self.proc.wait(timeout=30)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def restart_postgres() -> None:
    version = sorted(os.listdir("/etc/postgresql"))[-1]
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart", "-m", "fast"],
                   check=True, capture_output=True)


class Monitor:
    """Reads the database with a connection that survives a PostgreSQL restart."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.conn: psycopg.Connection | None = None

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        for _ in range(600):
            try:
                if self.conn is None or self.conn.closed:
                    self.conn = psycopg.connect(self.url, autocommit=True, connect_timeout=3)
                return self.conn.execute(sql, params).fetchall()
            except psycopg.OperationalError:
                self.conn = None
                time.sleep(0.1)
        raise RuntimeError("database did not come back")

    def processed(self) -> int:
        return self.query("SELECT COUNT(*) FROM signals WHERE processed = 1")[0][0]

    def finished(self) -> int:
        return self.query("SELECT COUNT(*) FROM signals WHERE processed = 1 OR dead_at IS NOT NULL")[0][0]


def plan_rows(rows: int, poison_ratio: float, rng: random.Random) -> tuple[list[tuple], dict[int, str]]:
    """All rows to insert, ~poison_ratio of them poison, spread through; and poison id -> kind."""
    poison_count = max(len(POISON_KINDS), round(rows * poison_ratio))
    poison_ids = set(rng.sample(range(1, rows + 1), poison_count))
    kinds: dict[int, str] = {}
    now = datetime.now(UTC)
    planned = []
    for row_id in range(1, rows + 1):
        name, value = f"signal-{row_id % 97}", rng.uniform(-100, 100)
        if row_id in poison_ids:
            kind = POISON_KINDS[len(kinds) % len(POISON_KINDS)]
            kinds[row_id] = kind
            name, value = {
                "nan": (name, math.nan), "inf": (name, math.inf), "-inf": (name, -math.inf),
                "null name": (None, value), "null value": (name, None),
                "too large": ("x" * (MAX_PAYLOAD + 100), value),
            }[kind]
        planned.append((row_id, name, value, rng.choice(("sensor", "api", "manual")), now))
    return planned, kinds


class Inserter(threading.Thread):
    """Inserts the planned rows at a steady rate, so every fault happens under load. Survives a
    PostgreSQL restart: a chunk whose commit is in doubt is inserted again, skipping ids it has."""

    def __init__(self, db_url: str, planned: list[tuple], seconds: float) -> None:
        super().__init__(daemon=True)
        self.db_url = db_url
        self.planned = planned
        self.seconds = seconds
        self.inserted = 0

    def run(self) -> None:
        tick = 0.1
        chunk = max(1, math.ceil(len(self.planned) / (self.seconds / tick)))
        started = time.monotonic()
        conn = None
        for number, first in enumerate(range(0, len(self.planned), chunk)):
            rows = self.planned[first:first + chunk]
            while True:
                try:
                    if conn is None or conn.closed:
                        conn = psycopg.connect(self.db_url, connect_timeout=3)
                    with conn.cursor() as cur:
                        cur.executemany(
                            "INSERT INTO signals (id, name, value, source, timestamp)"
                            " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (id) DO NOTHING", rows)
                    conn.commit()
                    break
                except psycopg.OperationalError:
                    conn = None
                    time.sleep(0.1)
            self.inserted = first + len(rows)
            time.sleep(max(0.0, started + (number + 1) * tick - time.monotonic()))
        if conn is not None:
            conn.close()


def run_chaos(cfg: ChaosConfig, out=sys.stdout) -> ChaosReport:
    rng = random.Random(cfg.seed)
    schema = f"chaos_{uuid.uuid4().hex[:8]}"
    db_url = f"{cfg.pg}?options={quote(f'-csearch_path={schema}')}"
    broker = PrivateRedis()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PULSE_", "PROMETHEUS_"))}
    env.update(
        PULSE_DB_URL=db_url, PULSE_BROKER_URL=broker.url, PULSE_BATCH_SIZE=str(cfg.batch_size),
        PULSE_LEASE_SECONDS=str(cfg.lease_seconds), PULSE_MAX_ATTEMPTS="3",
        PULSE_RETRY_BASE_SECONDS="0.2", PULSE_RETRY_CAP_SECONDS="1", PULSE_MAX_PAYLOAD_BYTES=str(MAX_PAYLOAD),
        PULSE_DB_POLL_INTERVAL="0.2", PULSE_BACKPRESSURE_HIGH="0",
    )
    pool_cmd = [sys.executable, "-m", "pool"]
    with psycopg.connect(cfg.pg, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    monitor = Monitor(db_url)
    proc: subprocess.Popen | None = None
    try:
        broker.start()
        subprocess.run([*pool_cmd, "init-db"], env=env, check=True, capture_output=True)
        planned, poison = plan_rows(cfg.rows, cfg.poison_ratio, rng)
        report = ChaosReport(rows=cfg.rows, good=cfg.rows - len(poison), poison=len(poison))

        proc = subprocess.Popen([*pool_cmd, "start", "--workers", str(cfg.workers), "--metrics-port", "0",
                                 "--shutdown-timeout", "30"],
                                env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        pids: dict[str, int] = {}
        ready_at: list[tuple[str, float]] = []  # (poller, time) of each restarted poller's ready
        ready = threading.Event()
        log_lines: list[str] = []

        def read_log() -> None:
            assert proc is not None and proc.stderr is not None
            for line in proc.stderr:
                log_lines.append(line)
                if m := re.search(r"started (poller-\d+) \(pid (\d+)\)", line):
                    pids[m[1]] = int(m[2])
                if m := re.search(r"(poller-\d+) \(pid \d+\) ready again", line):
                    ready_at.append((m[1], time.monotonic()))
                if "ready:" in line:
                    ready.set()

        threading.Thread(target=read_log, daemon=True).start()
        if not ready.wait(120):
            raise RuntimeError("pool start did not get ready:\n" + "".join(log_lines[-20:]))
        started = time.monotonic()
        total = cfg.rows
        inserter = Inserter(db_url, planned, cfg.insert_seconds)
        inserter.start()
        print(f"inserting {cfg.rows} rows ({len(poison)} poison) over {cfg.insert_seconds:.0f} s"
              f" into schema {schema}", file=out)

        def first_ack_after(mark: float, before: int) -> float | None:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                if monitor.processed() > before:
                    return time.monotonic() - mark
                time.sleep(0.05)
            return None

        def fault_schedule() -> None:
            time.sleep(cfg.redis_stop_at)
            broker.stop()
            print(f"[{time.monotonic() - started:6.1f}s] Redis stopped", file=out)
            time.sleep(cfg.redis_stop_for)
            before = monitor.processed()
            broker.start()
            back = time.monotonic()
            print(f"[{back - started:6.1f}s] Redis started again", file=out)
            report.redis_recovery = first_ack_after(back, before)
            time.sleep(max(0.0, cfg.pg_restart_at - (time.monotonic() - started)))
            restart_postgres()
            back = time.monotonic()
            before = monitor.processed()  # read once PostgreSQL is back, so only later acks count
            print(f"[{back - started:6.1f}s] PostgreSQL restarted", file=out)
            report.pg_recovery = first_ack_after(back, before)

        faults = threading.Thread(target=fault_schedule, daemon=True)
        faults.start()
        kill_times: list[tuple[str, float]] = []
        deadline = started + cfg.timeout
        next_kill = started + rng.uniform(*cfg.kill_every)
        while monitor.finished() < total or faults.is_alive():
            now = time.monotonic()
            if now > deadline:
                report.problems.append(f"not finished within {cfg.timeout:.0f} s")
                break
            if now >= next_kill and monitor.finished() < total:
                name = rng.choice(sorted(pids))
                with_pid = pids[name]
                try:
                    os.kill(with_pid, signal.SIGKILL)
                    kill_times.append((name, time.monotonic()))
                    report.kills += 1
                except ProcessLookupError:
                    pass
                next_kill = time.monotonic() + rng.uniform(*cfg.kill_every)
            time.sleep(0.05)
        report.seconds = time.monotonic() - started
        # Recovery of a kill: until the same poller, restarted, reports ready.
        for name, killed_at in kill_times:
            later = [t for poller, t in ready_at if poller == name and t > killed_at]
            if later:
                report.kill_recovery.append(min(later) - killed_at)
        proc.send_signal(signal.SIGTERM)
        report.exit_code = proc.wait(timeout=120)
        check(report, monitor, broker, poison, cfg)
        return report
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        if monitor.conn is not None:
            monitor.conn.close()
        broker.cleanup()
        with psycopg.connect(cfg.pg, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


def check(report: ChaosReport, monitor: Monitor, broker: PrivateRedis, poison: dict[int, str],
          cfg: ChaosConfig) -> None:
    client = redis.Redis(port=broker.port)
    ids: Counter[int] = Counter()
    length = client.llen("celery")
    for start in range(0, length, 10_000):
        for raw in client.lrange("celery", start, start + 9_999):
            ids[int(json.loads(raw)["headers"]["id"].removeprefix("signal-"))] += 1
    good = set(range(1, cfg.rows + 1)) - set(poison)
    processed = {r[0] for r in monitor.query("SELECT id FROM signals WHERE processed = 1")}
    dead = {r[0]: r[1] for r in monitor.query("SELECT id, last_error FROM signals WHERE dead_at IS NOT NULL")}
    report.messages = length
    report.processed_good = len(good & processed)
    report.good_on_broker = len(good & set(ids))
    report.duplicates = sum(n - 1 for n in ids.values())
    report.duplicate_bound = report.kills * cfg.batch_size
    report.dead_poison = len(set(poison) & set(dead))
    report.poison_with_error = sum(1 for i in poison if dead.get(i))
    report.dead_and_processed = len(processed & set(dead))
    if report.processed_good != len(good):
        report.problems.append(f"{len(good) - report.processed_good} good rows not processed")
    if report.good_on_broker != len(good):
        report.problems.append(f"{len(good) - report.good_on_broker} good task ids missing on the broker")
    if set(ids) - good:
        report.problems.append(f"{len(set(ids) - good)} poison rows reached the broker")
    if report.duplicates > report.duplicate_bound:
        report.problems.append("more duplicates than the kills explain")
    if report.dead_poison != len(poison) or report.poison_with_error != len(poison):
        report.problems.append(f"{len(poison) - report.poison_with_error} poison rows not dead with an error")
    if report.dead_and_processed:
        report.problems.append(f"{report.dead_and_processed} rows both dead and processed")
    if dead.keys() - poison.keys():
        report.problems.append(f"{len(dead.keys() - poison.keys())} good rows dead")
    if report.exit_code != 0:
        report.problems.append(f"pool start exited {report.exit_code}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--pg", default="postgresql://root@127.0.0.1:5432/test")
    parser.add_argument("--insert-seconds", type=float, default=20.0,
                        help="spread the inserts over this long; faults happen within it")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    report = run_chaos(ChaosConfig(rows=args.rows, workers=args.workers, batch_size=args.batch_size,
                                   insert_seconds=args.insert_seconds, pg=args.pg, seed=args.seed))
    print("\n".join(report.lines()))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
