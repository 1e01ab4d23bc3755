"""`pool start`, `pool status` and `pool prune` on seed-shaped tables whose timestamp column is text
or epoch numbers, with an unreadable value (garbage text, an epoch past any calendar, 'infinity')
in the oldest pending row. Before, the coordinator's status read failed on each ("operator does
not exist: timestamp with time zone - text", "cannot subtract infinite timestamps"): /readyz 503,
`pool status` exit 1, `pool prune` failed; on SQLite, epoch numbers were read as Julian days, so
no row was ever pruned."""

from __future__ import annotations

import json
import signal
import socket
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import create_engine, text

from tests.helpers import PoolProcess, clean_env, run_pool, wait_until

GOOD, OLD = 20, 5
CREATE = """CREATE TABLE signals (id {id_type}, name VARCHAR(255), value FLOAT, source VARCHAR(255),
                                  timestamp {ts_type}, processed INTEGER DEFAULT 0)"""
ID_TYPES = {"postgresql": "SERIAL PRIMARY KEY", "sqlite": "INTEGER PRIMARY KEY AUTOINCREMENT"}
# Leased by someone else until far ahead, so it stays the oldest pending row throughout.
PARKED_UNTIL = {"postgresql": "clock_timestamp() + interval '1 day'", "sqlite": "'9999-01-01 00:00:00.000'"}


def iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def epoch(moment: datetime) -> int:
    return int(moment.timestamp())


CASES = {
    # name: (dialect, column type, how a time is written, the parked row's unreadable value)
    "postgresql-text": ("postgresql", "TEXT", iso, "garbage"),
    "postgresql-bigint-epoch": ("postgresql", "BIGINT", epoch, 10**15),
    "postgresql-timestamptz-infinity": ("postgresql", "TIMESTAMPTZ", lambda m: m, "infinity"),
    "sqlite-integer-epoch": ("sqlite", "TIMESTAMP", epoch, "garbage"),
}


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        return probe.getsockname()[1]


def readyz(port: int) -> int:
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10).status
    except urllib.error.HTTPError as exc:
        return exc.code


def status(env, cwd) -> tuple[int, dict]:
    result = run_pool("status", "--json", env=env, cwd=cwd)
    assert result.returncode in (0, 1), result.stderr
    return result.returncode, json.loads(result.stdout)


@pytest.mark.parametrize("case", CASES)
def test_status_readyz_and_prune_work_on_text_and_epoch_columns_with_unreadable_values(case, request,
                                                                                       tmp_path):
    dialect, ts_type, write, unreadable = CASES[case]
    if dialect == "postgresql":
        db_url = request.getfixturevalue("pg_url")
        env = clean_env(PULSE_DB_URL=db_url, PULSE_BROKER_URL=request.getfixturevalue("redis_url"),
                        PULSE_QUEUE=request.getfixturevalue("queue_name"))
    else:
        db_url = request.getfixturevalue("sqlite_url")
        env = clean_env(PULSE_DB_URL=db_url)
    port = free_port()
    env.update(PULSE_METRICS_PORT=str(port), PULSE_STATUS_INTERVAL="0.3")
    engine = create_engine(db_url)
    try:
        with engine.begin() as conn:
            conn.execute(text(CREATE.format(id_type=ID_TYPES[dialect], ts_type=ts_type)))
        prepared = run_pool("init-db", env=env, cwd=tmp_path)
        assert prepared.returncode == 0, prepared.stderr
        now = datetime.now(UTC)
        insert = text("INSERT INTO signals (name, value, source, timestamp, processed)"
                      " VALUES ('n', 1.0, 's', :ts, :p)")
        with engine.begin() as conn:
            conn.execute(text(
                "INSERT INTO signals (name, value, source, timestamp, processed, lease_owner, lease_token,"
                f" lease_until) VALUES ('parked', 1.0, 's', :ts, 0, 'elsewhere', 1, {PARKED_UNTIL[dialect]})"
            ), {"ts": unreadable})
            conn.execute(insert, [{"ts": write(now - timedelta(days=2)), "p": 0} for _ in range(GOOD)])
            conn.execute(insert, [{"ts": write(now - timedelta(days=30)), "p": 1} for _ in range(OLD)])
    finally:
        engine.dispose()

    pool = PoolProcess("start", "--workers", "1", env=env, cwd=tmp_path)
    try:
        pool.wait_for_line(r"ready: 1 pollers")
        wait_until(lambda: status(env, tmp_path)[1]["status"]["backlog"] == 1, timeout=60, interval=0.3,
                   message="every good row relayed and the coordinator's status read")
        code, report = status(env, tmp_path)
        assert code == 0, report["problems"]
        assert report["unprocessed"] == 1
        assert report["status"]["lag_seconds"] is None  # the oldest pending row names no time
        assert readyz(port) == 200
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        assert "pool_backlog_rows 1.0" in metrics and "pool_dead_rows 0.0" in metrics

        pruned = run_pool("prune", "--processed-older-than", "10d", env=env, cwd=tmp_path)
        assert pruned.returncode == 0, pruned.stderr
        assert f"pruned {OLD} processed rows" in pruned.stdout
        assert status(env, tmp_path)[1]["processed"] == GOOD

        pool.signal(signal.SIGTERM)
        assert pool.wait(timeout=60) == 0, pool.output()
    finally:
        pool.kill()
    assert "Traceback" not in pool.output()


def test_a_column_no_time_can_be_read_from_is_refused_by_init_db_and_start_in_one_line(pg_url, tmp_path):
    engine = create_engine(pg_url)
    try:
        with engine.begin() as conn:
            conn.execute(text(CREATE.format(id_type=ID_TYPES["postgresql"], ts_type="INTERVAL")))
    finally:
        engine.dispose()
    env = clean_env(PULSE_DB_URL=pg_url, PULSE_METRICS_PORT="0")
    for command in (("init-db",), ("start", "--workers", "1")):
        refused = run_pool(*command, env=env, cwd=tmp_path, timeout=60)
        assert refused.returncode == 2, (command, refused.stdout, refused.stderr)
        assert refused.stderr.strip().splitlines() == [
            "pool: error: column 'timestamp' of table 'signals' is interval: pool reads times from"
            " timestamptz, timestamp, date, text (ISO-8601) or a number of epoch seconds; change its type"
            " or set PULSE_DB_COLUMN_TIMESTAMP"
        ], command
