"""Measure insert -> broker latency of `pool start` under a steady insert load, on this machine.

    python loadtest/run_latency.py                      # 2,000 inserts/s for 60 s, 8 workers
    python loadtest/run_latency.py --poll-interval 0.05 # with PULSE_DB_POLL_INTERVAL set

Creates a fresh PostgreSQL schema and runs `pool init-db` in it, flushes a Redis database of its
own (12 by default), starts `pool start --workers 8 --metrics-port 0` and waits for its `ready:`
line, then runs

    locust -f loadtest/locustfile.py --headless --users 20 --spawn-rate 20 --run-time 60s \\
        --csv <out>/latency --stop-timeout 5

with POOL_LOAD_RATE=2000. It stops pool with SIGTERM, drops the schema, flushes the Redis
database, and prints the `insert` and `insert->broker` rows of <out>/latency_stats.csv. Every
step has a time limit, and it talks to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from urllib.parse import quote, urlsplit

import psutil
import psycopg
import redis

ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
READY_TIMEOUT = 120.0
STOP_TIMEOUT = 60.0
COLUMNS = ["Type", "Name", "Request Count", "Failure Count", "Median Response Time", "95%", "99%",
           "Average Response Time", "Requests/s"]


def loopback_only(url: str) -> str:
    host = urlsplit(url).hostname
    if host not in LOOPBACK:
        raise SystemExit(f"refusing to talk to {host!r}: this measurement runs against 127.0.0.1 only")
    return url


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=2000.0, help="total inserts/s (POOL_LOAD_RATE)")
    parser.add_argument("--run-time", default="60s", help="locust --run-time")
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--poll-interval", default=None,
                        help="PULSE_DB_POLL_INTERVAL for pool start (default: pool's own default)")
    parser.add_argument("--pg", default="postgresql://root@127.0.0.1:5432/test")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/12")
    parser.add_argument("--queue", default="celery")
    parser.add_argument("--pool-src", default=str(ROOT),
                        help="folder holding the pool package to run (default: this checkout)")
    parser.add_argument("--out", default=None,
                        help="folder for the CSV files and logs (default: a new temp dir)")
    args = parser.parse_args()
    loopback_only(args.pg)
    loopback_only(args.redis)
    if not args.redis.startswith("redis://"):
        raise SystemExit("--redis must be a redis:// URL")
    out = Path(args.out or tempfile.mkdtemp(prefix="pool-latency-"))
    out.mkdir(parents=True, exist_ok=True)

    schema = f"latency_{uuid.uuid4().hex[:8]}"
    db_url = f"{args.pg}?options={quote(f'-csearch_path={schema}')}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PULSE_", "POOL_LOAD_"))}
    env.update(PULSE_DB_URL=db_url, PULSE_BROKER_URL=args.redis, PULSE_QUEUE=args.queue,
               PULSE_LOG_LEVEL="INFO")
    if args.poll_interval is not None:
        env["PULSE_DB_POLL_INTERVAL"] = args.poll_interval
    pool_cmd = [sys.executable, "-m", "pool"]  # run with cwd=--pool-src: `-m` imports pool from there
    pool_src = Path(args.pool_src).resolve()
    locust_cmd = [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtest" / "locustfile.py"),
                  "--headless", "--users", str(args.users), "--spawn-rate", str(args.users),
                  "--run-time", args.run_time, "--csv", str(out / "latency"), "--stop-timeout", "5"]
    run_seconds = parse_duration(args.run_time)

    broker = redis.Redis.from_url(args.redis, socket_timeout=10, socket_connect_timeout=5)
    with psycopg.connect(args.pg, autocommit=True, connect_timeout=10) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    pool = None
    summary: dict[str, object] = {}
    try:
        broker.flushdb()
        init = subprocess.run([*pool_cmd, "init-db"], env=env, cwd=pool_src, capture_output=True, text=True,
                              timeout=120)
        print(f"$ pool init-db  (schema {schema}, pool from {pool_src})")
        print((init.stdout + init.stderr).rstrip())
        if init.returncode:
            return 1

        pool_log = open(out / "pool.log", "w")  # noqa: SIM115 - closed in finally via the reader
        pool = subprocess.Popen([*pool_cmd, "start", "--workers", str(args.workers), "--metrics-port", "0"],
                                env=env, cwd=pool_src, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        ready = threading.Event()
        metrics_url: list[str] = []

        def read() -> None:
            assert pool is not None and pool.stdout is not None
            for line in pool.stdout:
                pool_log.write(line)
                pool_log.flush()
                if "ready:" in line:
                    metrics_url.extend(re.findall(r"http://\S+/metrics", line))
                    ready.set()
            pool_log.close()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        launched = time.monotonic()
        while not ready.wait(0.2):
            if pool.poll() is not None or time.monotonic() - launched > READY_TIMEOUT:
                print(f"pool start did not get ready (exit {pool.poll()}); see {out / 'pool.log'}")
                return 1
        interval = f"{args.poll_interval} s" if args.poll_interval else "pool default (unset)"
        print(f"pool start ready after {time.monotonic() - launched:.1f} s "
              f"(workers {args.workers}, poll interval {interval})")

        locust_env = dict(env, POOL_LOAD_RATE=f"{args.rate:g}")
        print(f"$ POOL_LOAD_RATE={args.rate:g} {' '.join(locust_cmd[2:])}")
        load_before = os.getloadavg()[0]
        cpu_before = child_cpu()
        machine_before = machine_cpu()
        pool_before = tree_cpu(pool.pid)
        services = ServiceCpu()
        services.start()
        metrics_before = scrape(metrics_url)
        with open(out / "locust.log", "w") as log:
            started = time.monotonic()
            result = subprocess.run(locust_cmd, env=locust_env, cwd=ROOT, stdout=log,
                                    stderr=subprocess.STDOUT, timeout=run_seconds + 120)
        wall = time.monotonic() - started
        cpu = child_cpu() - cpu_before
        pool_cpu = tree_cpu(pool.pid) - pool_before
        service_cpu = services.stop()
        busy, total = (after - before for after, before in zip(machine_cpu(), machine_before, strict=True))
        print(f"locust exited {result.returncode} after {wall:.1f} s (log: {out / 'locust.log'})")
        print(f"  CPU: locust {cpu:.1f} s ({100 * cpu / wall:.0f}% of one core); pool {pool_cpu:.1f} s "
              f"({100 * pool_cpu / wall:.0f}% of one core); postgres+redis {service_cpu:.1f} s "
              f"({100 * service_cpu / wall:.0f}% of one core); whole machine "
              f"{100 * busy / max(total, 1):.0f}% busy of {os.cpu_count()} cores; load average "
              f"{load_before:.2f} before, {os.getloadavg()[0]:.2f} after")
        metrics = {k: v - metrics_before.get(k, 0.0) for k, v in scrape(metrics_url).items()}
        if metrics.get("batches"):
            print(f"  pool during the run: {metrics['batches']:.0f} non-empty batches, "
                  f"{metrics['claimed'] / metrics['batches']:.1f} rows/batch on average, "
                  f"{1000 * metrics['batch_seconds'] / metrics['batches']:.1f} ms mean batch duration "
                  f"(claim+publish+ack, from /metrics)")
        with open(out / "locust.log") as f:
            for line in f:
                if "pool.loadtest" in line or "CPU usage" in line:
                    print("  " + line.rstrip())

        with psycopg.connect(db_url, autocommit=True, connect_timeout=10) as conn:
            summary["rows"], summary["processed"] = conn.execute(
                "SELECT COUNT(*), COUNT(*) FILTER (WHERE processed = 1) FROM signals").fetchone()
        summary["left on broker"] = broker.llen(args.queue)
    finally:
        if pool is not None and pool.poll() is None:
            pool.send_signal(signal.SIGTERM)
            try:
                summary["pool exit code"] = pool.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(pool.pid, signal.SIGKILL)  # its own session: the supervisor and its children
                pool.wait(timeout=10)
                summary["pool exit code"] = f"killed after {STOP_TIMEOUT:.0f} s"
        broker.flushdb()
        broker.close()
        with psycopg.connect(args.pg, autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')

    for key, value in summary.items():
        print(f"{key:<16}{value}")
    with open(out / "pool.log") as f:
        warnings = [line.rstrip() for line in f if " WARNING " in line or " ERROR " in line]
    print(f"pool warnings/errors: {len(warnings)}" + "".join(f"\n  {w}" for w in warnings[:10]))
    print_stats(out / "latency_stats.csv")
    return 0 if result.returncode == 0 else 1


def machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    fields = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields[:8]) - idle, sum(fields[:8])


def scrape(urls: list[str]) -> dict[str, float]:
    """Totals over all pollers of the few pool metrics this report uses."""
    wanted = {"pool_batch_duration_seconds_count": "batches",
              "pool_batch_duration_seconds_sum": "batch_seconds",
              "pool_signals_claimed_total": "claimed"}
    totals: dict[str, float] = {}
    if not urls:
        return totals
    loopback_only(urls[0])
    try:
        with urllib.request.urlopen(urls[0], timeout=10) as response:
            text = response.read().decode()
    except OSError:
        return totals
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in wanted:
            totals[wanted[name]] = totals.get(wanted[name], 0.0) + float(line.rsplit(" ", 1)[1])
    return totals


class ServiceCpu(threading.Thread):
    """CPU seconds of every PostgreSQL and Redis process (backends come and go), sampled each second."""

    NAMES = ("postgres", "redis-server")

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self.done = threading.Event()
        self._sample(initial=True)

    def _sample(self, initial: bool = False) -> None:
        for process in psutil.process_iter(["name", "cpu_times"]):
            if process.info["name"] in self.NAMES and process.info["cpu_times"] is not None:
                times = process.info["cpu_times"]
                cpu = times.user + times.system
                # A backend born during the run started from zero.
                self.first.setdefault(process.pid, cpu if initial else 0.0)
                self.last[process.pid] = cpu

    def run(self) -> None:
        while not self.done.wait(1.0):
            self._sample()

    def stop(self) -> float:
        self.done.set()
        self.join(timeout=5)
        self._sample()
        return sum(self.last[pid] - self.first[pid] for pid in self.last)


def tree_cpu(pid: int) -> float:
    """CPU seconds used so far by a process and its live children (pool's supervisor and pollers)."""
    total = 0.0
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return total
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def child_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def print_stats(path: Path) -> None:
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["Name"] in ("insert", "insert->broker")]
    print(f"\n{path}:")
    print(",".join(COLUMNS))
    for row in rows:
        print(",".join(row[c] for c in COLUMNS))
    for row in rows:
        print(f"{row['Name']:<15} count {row['Request Count']:>7}  failures {row['Failure Count']:>5}  "
              f"p50 {row['Median Response Time']:>6} ms  p95 {row['95%']:>6} ms  p99 {row['99%']:>6} ms  "
              f"avg {float(row['Average Response Time']):8.1f} ms  {float(row['Requests/s']):8.1f}/s")


def parse_duration(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    total, number = 0.0, ""
    for ch in text:
        if ch.isdigit() or ch == ".":
            number += ch
        else:
            total += float(number) * units[ch]
            number = ""
    return total + (float(number) if number else 0.0)


if __name__ == "__main__":
    sys.exit(main())
