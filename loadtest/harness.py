"""Shared steps of the drain measurements: run `pool start` and wait until a backlog is relayed."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import psycopg
import redis

POOL = [sys.executable, "-m", "pool"]


def pool_env(**pulse: str) -> dict[str, str]:
    """This process's environment without PULSE_* / PROMETHEUS_* settings, plus the given ones."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PULSE_", "PROMETHEUS_"))}
    env.update(pulse)
    return env


def start_pool(env: dict[str, str], workers: int, ready_timeout: float = 120) -> subprocess.Popen:
    """`pool start --workers N`, returned once it logged its ready line."""
    proc = subprocess.Popen([*POOL, "start", "--workers", str(workers), "--metrics-port", "0"],
                            env=env, stderr=subprocess.PIPE, text=True)
    ready = threading.Event()

    def read() -> None:
        for line in proc.stderr:
            if "ready:" in line:
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(ready_timeout):
        proc.kill()
        raise SystemExit("pool start did not get ready")
    return proc


def wait_drained(broker: redis.Redis, conn: psycopg.Connection, rows: int, queue: str = "celery") -> None:
    """Until every row is on the broker and none is left unprocessed."""
    # LLEN is cheap; the COUNT scans the table, so it only runs once all messages are in.
    while broker.llen(queue) < rows:
        time.sleep(0.02)
    while conn.execute("SELECT COUNT(*) FROM signals WHERE processed = 0").fetchone()[0]:
        time.sleep(0.02)
