"""`pool start --log-format json|kv` as a log shipper sees it: every line of every process parses.

Needs no service: the embedded SQLite database and filesystem broker under tmp_path.
"""

from __future__ import annotations

import json
import re
import signal
import sqlite3
from contextlib import closing

import pytest

from tests.helpers import PoolProcess, clean_env, parse_kv, row_counts, run_pool, wait_until

ROWS = 40


def processed(env, cwd) -> int:
    counts = row_counts(env, cwd)
    return counts["processed"] + counts["dead"]


def seed_with_a_poison_row(env, tmp_path) -> None:
    assert run_pool("seed", "--count", str(ROWS), env=env, cwd=tmp_path).returncode == 0
    with closing(sqlite3.connect(tmp_path / "pulse_signals.db")) as conn, conn:
        conn.execute("INSERT INTO signals (name, value, source, processed) VALUES (NULL, 1.0, 's', 0)")


def run_and_stop(env, tmp_path, log_format: str) -> PoolProcess:
    pool = PoolProcess("start", "--workers", "2", "--metrics-port", "0", "--max-attempts", "1",
                       "--log-level", "DEBUG", "--log-format", log_format, env=env, cwd=tmp_path)
    try:
        pool.wait_for_line(r"ready: 2 pollers")
        wait_until(lambda: processed(env, tmp_path) == ROWS + 1, timeout=60, message="every row settled")
        pool.signal(signal.SIGTERM)
        assert pool.wait(timeout=60) == 0, pool.output()
    finally:
        pool.kill()
    return pool


def test_every_line_of_every_process_is_one_json_object(tmp_path):
    env = clean_env()
    seed_with_a_poison_row(env, tmp_path)
    pool = run_and_stop(env, tmp_path, "json")

    events = []
    for line in pool.lines:
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"not a JSON line: {line!r}\n{pool.output()}")
    assert all(isinstance(e, dict) and {"ts", "level", "process", "logger", "msg"} <= e.keys()
               for e in events)
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", e["ts"]) for e in events)
    assert {"pool", "coordinator", "poller-0", "poller-1"} <= {e["process"] for e in events}
    batches = [e for e in events if e["msg"] == "batch done"]
    assert batches and sum(e["claimed"] for e in batches) == ROWS + 1
    assert {e["process"] for e in batches} <= {"poller-0", "poller-1"}
    (dead,) = [e for e in events if e.get("event") == "row_dead"]
    assert dead["level"] == "warning" and dead["row_id"] == ROWS + 1 and dead["attempts"] == 1
    assert "name" in dead["error"]


def test_every_line_of_every_process_is_logfmt(tmp_path):
    env = clean_env(PULSE_LOG_FORMAT="kv")
    seed_with_a_poison_row(env, tmp_path)
    pool = run_and_stop(env, tmp_path, "kv")

    events = [parse_kv(line) for line in pool.lines]
    assert all(list(e)[:5] == ["ts", "level", "process", "logger", "msg"] for e in events)
    assert any(e["msg"] == "batch done" and e["process"].startswith("poller-") for e in events)
    assert any(e.get("event") == "row_dead" for e in events)
