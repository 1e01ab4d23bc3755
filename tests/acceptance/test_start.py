"""`pool start --workers 4` as a user runs it: every row relayed once, SIGTERM exits 0."""

from __future__ import annotations

import os
import re
import signal
import socket
import sqlite3
import urllib.request
from collections import Counter
from contextlib import closing

import psycopg

from tests.helpers import (
    PoolProcess,
    clean_env,
    filesystem_messages,
    redis_messages,
    row_counts,
    run_pool,
    wait_until,
)
from tests.tcp_proxy import kernel_tcp_sockets

ROWS = 5_000


def counts(run_env, cwd) -> dict:
    return row_counts(run_env, cwd)


def scrape(port: str) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    totals: Counter[str] = Counter()
    for line in text.splitlines():
        if match := re.match(r"^(pool_signals_\w+_total)\{[^}]*\} ([0-9.e+]+)$", line):
            totals[match[1]] += float(match[2])
    return totals


def relay_and_stop(env, cwd) -> PoolProcess:
    """Start pool, wait for every row to be processed, check metrics, SIGTERM; returns the process."""
    pool = PoolProcess("start", "--workers", "4", "--metrics-port", "0", env=env, cwd=cwd)
    try:
        port = pool.wait_for_line(r"ready: 4 pollers, metrics on http://127\.0\.0\.1:(\d+)/metrics")[1]
        wait_until(lambda: counts(env, cwd)["unprocessed"] == 0, timeout=180, interval=0.5,
                   message="all rows processed")
        assert counts(env, cwd) == {"processed": ROWS, "unprocessed": 0, "dead": 0}
        totals = scrape(port)
        assert totals["pool_signals_acked_total"] == ROWS
        assert totals["pool_signals_published_total"] == ROWS
        pool.signal(signal.SIGTERM)
        assert pool.wait(timeout=60) == 0, pool.output()
    finally:
        pool.kill()
    assert "Traceback" not in pool.output()
    return pool


def assert_each_task_once(messages) -> None:
    ids = Counter(m["id"] for m in messages)
    assert len(messages) == ROWS
    assert set(ids) == {f"signal-{i}" for i in range(1, ROWS + 1)}
    assert max(ids.values()) == 1
    assert {m["task"] for m in messages} == {"ingest_and_score_signal"}


def test_postgres_and_redis(pg_url, redis_url, queue_name, tmp_path):
    env = clean_env(PULSE_DB_URL=pg_url, PULSE_BROKER_URL=redis_url, PULSE_QUEUE=queue_name)
    seeded = run_pool("seed", "--count", str(ROWS), env=env, cwd=tmp_path)
    assert seeded.returncode == 0, seeded.stderr
    relay_and_stop(env, tmp_path)
    assert_each_task_once(redis_messages(redis_url, queue_name))


def test_embedded_default_needs_no_configuration(tmp_path):
    env = clean_env()
    seeded = run_pool("seed", "--count", str(ROWS), env=env, cwd=tmp_path)
    assert seeded.returncode == 0, seeded.stderr
    assert (tmp_path / "pulse_signals.db").exists()
    pool = relay_and_stop(env, tmp_path)
    assert_each_task_once(filesystem_messages(tmp_path / "pool_broker"))
    # Nothing went wrong, so nothing warns (kombu warned of a hostname the filesystem lacks).
    assert [line for line in pool.output().splitlines() if " WARNING " in line] == []


def test_a_seed_shaped_table_made_by_plain_sql_is_taken_over_and_relayed(pg_url, redis_url, queue_name,
                                                                          tmp_path):
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("""CREATE TABLE signals (id SERIAL PRIMARY KEY, name VARCHAR(255), value FLOAT,
                        source VARCHAR(255), timestamp TIMESTAMP, processed INTEGER DEFAULT 0)""")
        with conn.cursor().copy("COPY signals (name, value, source, timestamp) FROM STDIN") as copy:
            for i in range(ROWS):
                copy.write_row((f"legacy-{i}", i / 7, "sensor", "2025-06-01 12:00:00"))
    env = clean_env(PULSE_DB_URL=pg_url, PULSE_BROKER_URL=redis_url, PULSE_QUEUE=queue_name)

    refused = run_pool("start", "--workers", "1", env=env, cwd=tmp_path)
    assert refused.returncode == 2
    assert "run `pool init-db`" in refused.stderr and "Traceback" not in refused.stderr

    prepared = run_pool("init-db", env=env, cwd=tmp_path)
    assert prepared.returncode == 0, prepared.stderr
    assert "added column(s)" in prepared.stdout
    relay_and_stop(env, tmp_path)
    messages = redis_messages(redis_url, queue_name)
    assert_each_task_once(messages)
    sample = next(m for m in messages if m["id"] == "signal-8")["args"][0]
    assert sample == {"id": 8, "name": "legacy-7", "value": 1.0, "source": "sensor",
                      "timestamp": "2025-06-01T12:00:00+00:00"}


def test_a_killed_poller_is_restarted_and_its_shard_keeps_flowing(tmp_path):
    env = clean_env()
    assert run_pool("init-db", env=env, cwd=tmp_path).returncode == 0
    pool = PoolProcess("start", "--workers", "2", "--metrics-port", "0", env=env, cwd=tmp_path)
    try:
        pid = int(pool.wait_for_line(r"started poller-1 \(pid (\d+)\)")[1])
        pool.wait_for_line(r"ready: 2 pollers")
        os.kill(pid, signal.SIGKILL)
        pool.wait_for_line(rf"poller-1 \(pid {pid}\) exited with code -9")
        new_pid = int(pool.wait_for_line(r"poller-1 \(pid (\d+)\) ready again")[1])
        assert new_pid != pid
        # Rows of both shards (odd ids belong to poller-1) are relayed after the restart.
        assert run_pool("seed", "--count", "100", env=env, cwd=tmp_path).returncode == 0
        wait_until(lambda: counts(env, tmp_path)["unprocessed"] == 0, timeout=60,
                   message="rows of the restarted poller's shard relayed")
        assert counts(env, tmp_path)["processed"] == 100
        pool.signal(signal.SIGTERM)
        assert pool.wait(timeout=60) == 0, pool.output()
    finally:
        pool.kill()


def test_sigint_drains_idle_pollers_and_exits_0(tmp_path):
    env = clean_env()
    assert run_pool("init-db", env=env, cwd=tmp_path).returncode == 0
    pool = PoolProcess("start", "--workers", "2", "--metrics-port", "0", env=env, cwd=tmp_path)
    try:
        pool.wait_for_line(r"ready: 2 pollers")
        pool.signal(signal.SIGINT)
        assert pool.wait(timeout=60) == 0, pool.output()
    finally:
        pool.kill()


def test_a_second_signal_stops_at_once_even_with_a_batch_in_flight(tmp_path):
    # A broker that accepts connections but never answers keeps the poller inside a publish.
    with socket.create_server(("127.0.0.1", 0)) as silent_broker:
        port = silent_broker.getsockname()[1]
        env = clean_env(PULSE_BROKER_URL=f"redis://127.0.0.1:{port}/0")
        assert run_pool("seed", "--count", "10", env=env, cwd=tmp_path).returncode == 0
        pool = PoolProcess("start", "--workers", "1", "--metrics-port", "0", "--shutdown-timeout", "120",
                           env=env, cwd=tmp_path)
        try:
            pool.wait_for_line(r"ready: 1 pollers")
            wait_until(lambda: leased_rows(tmp_path / "pulse_signals.db") > 0, timeout=30,
                       message="a batch in flight")
            pool.signal(signal.SIGTERM)
            pool.wait_for_line(r"draining")
            pool.signal(signal.SIGTERM)
            code = pool.wait(timeout=30)
        finally:
            pool.kill()
    assert code == 3, pool.output()
    assert counts(env, tmp_path) == {"processed": 0, "unprocessed": 10, "dead": 0}


def test_a_poller_stuck_past_the_shutdown_timeout_is_killed_and_pool_start_exits_3(pg_url, tmp_path):
    # One SIGTERM only: the poller cannot finish a claim that waits on a lock the test holds.
    env = clean_env(PULSE_DB_URL=pg_url)
    assert run_pool("init-db", env=env, cwd=tmp_path).returncode == 0
    pool = PoolProcess("start", "--workers", "1", "--metrics-port", "0", "--shutdown-timeout", "1",
                       env=env, cwd=tmp_path)
    try:
        pool.wait_for_line(r"ready: 1 pollers")
        with psycopg.connect(pg_url) as lock:
            lock.execute("LOCK TABLE signals IN ACCESS EXCLUSIVE MODE")
            me = lock.info.backend_pid
            with psycopg.connect(pg_url, autocommit=True) as look:
                def claim_waits() -> bool:
                    return look.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))"
                        " AND query ILIKE %s", (me, "%SKIP LOCKED%")).fetchone()[0] > 0

                wait_until(claim_waits, timeout=30, message="the poller's claim waiting on the lock")
            pool.signal(signal.SIGTERM)
            code = pool.wait(timeout=30)
    finally:
        pool.kill()
    assert code == 3, pool.output()
    assert "poller-0 did not stop within the shutdown timeout; killing it" in pool.output()


def test_a_poller_killed_before_it_is_ready_is_restarted_and_pool_start_relays(tmp_path):
    # The OOM killer, an operator or a chaos tool may kill a child at any moment, start-up
    # included: it comes back at once and the rest of the pool never stops.
    env = clean_env()
    assert run_pool("init-db", env=env, cwd=tmp_path).returncode == 0
    assert run_pool("seed", "--count", "100", env=env, cwd=tmp_path).returncode == 0
    pool = PoolProcess("start", "--workers", "1", "--metrics-port", "0", env=env, cwd=tmp_path)
    try:
        coordinator = int(pool.wait_for_line(r"started coordinator \(pid (\d+)\)")[1])
        poller = int(pool.wait_for_line(r"started poller-0 \(pid (\d+)\)")[1])
        os.kill(poller, signal.SIGKILL)
        pool.wait_for_line(rf"poller-0 \(pid {poller}\) exited with code -9 after [0-9.]+ s;"
                           r" restarting in 0\.0 s")
        pool.wait_for_line(r"ready: 1 pollers")
        wait_until(lambda: counts(env, tmp_path)["unprocessed"] == 0, timeout=60, message="rows relayed")
        assert counts(env, tmp_path) == {"processed": 100, "unprocessed": 0, "dead": 0}
        assert pid_running(coordinator), "the coordinator was restarted or stopped"
        pool.signal(signal.SIGTERM)
        code = pool.wait(timeout=60)
    finally:
        pool.kill()
    assert code == 0, pool.output()
    assert "exited before it was ready" not in pool.output()


def pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def leased_rows(db_path) -> int:
    with closing(sqlite3.connect(db_path)) as conn:
        return conn.execute("SELECT COUNT(*) FROM signals WHERE lease_owner IS NOT NULL").fetchone()[0]


def test_a_taken_metrics_port_exits_2_with_the_reason(tmp_path):
    env = clean_env()
    assert run_pool("init-db", env=env, cwd=tmp_path).returncode == 0
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = run_pool("start", "--workers", "1", "--metrics-port", str(port), env=env, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert f"cannot serve metrics on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_pollers_stop_by_themselves_when_pool_start_is_killed(tmp_path):
    env = clean_env()
    assert run_pool("init-db", env=env, cwd=tmp_path).returncode == 0
    pool = PoolProcess("start", "--workers", "2", "--metrics-port", "0", env=env, cwd=tmp_path)
    try:
        children = [int(pool.wait_for_line(rf"started {name} \(pid (\d+)\)")[1])
                    for name in ("coordinator", "poller-0", "poller-1")]
        pool.wait_for_line(r"ready: 2 pollers")
        os.kill(pool.proc.pid, signal.SIGKILL)  # the supervisor alone, not its process group

        def all_gone() -> bool:
            for pid in children:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    continue
                # A zombie (not yet reaped by init) has stopped too.
                try:
                    with open(f"/proc/{pid}/stat") as stat:
                        if stat.read().split(") ")[1][0] != "Z":
                            return False
                except FileNotFoundError:
                    continue  # reaped between the two looks
            return True

        wait_until(all_gone, timeout=30, message="the orphaned children to stop")
    finally:
        pool.kill()
    assert "pool start is gone; stopping" in pool.output()


def test_children_are_forked_from_a_server_that_holds_no_thread_or_connection_and_outlives_signals(tmp_path):
    # What the fork server holds, every child would share: it may hold imports only.
    env = clean_env()
    assert run_pool("init-db", env=env, cwd=tmp_path).returncode == 0
    pool = PoolProcess("start", "--workers", "2", "--metrics-port", "0", env=env, cwd=tmp_path)
    try:
        pollers = [int(pool.wait_for_line(rf"started poller-{i} \(pid (\d+)\)")[1]) for i in range(2)]
        pool.wait_for_line(r"ready: 2 pollers")
        parents = set()
        for pid in pollers:
            with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
                parents.add(int(stat.read().rsplit(")", 1)[1].split()[1]))
        (server,) = parents
        with open(f"/proc/{server}/cmdline", encoding="utf-8") as cmdline:
            assert "multiprocessing.forkserver" in cmdline.read()
        assert len(os.listdir(f"/proc/{server}/task")) == 1, "the fork server runs a thread"
        sockets = {os.readlink(f"/proc/{server}/fd/{fd}")[len("socket:["):-1]
                   for fd in os.listdir(f"/proc/{server}/fd")
                   if os.readlink(f"/proc/{server}/fd/{fd}").startswith("socket:[")}
        tcp_inodes = {fields[9] for fields in kernel_tcp_sockets()}
        assert not sockets & tcp_inodes, "the fork server holds a TCP connection"
        # A signal to the whole process group (a closing terminal, supervisord's stopasgroup)
        # must not end the server: a poller killed afterwards is still replaced.
        os.kill(server, signal.SIGTERM)
        os.kill(server, signal.SIGHUP)
        os.kill(pollers[0], signal.SIGKILL)
        replaced = int(pool.wait_for_line(r"poller-0 \(pid (\d+)\) ready again")[1])
        assert replaced != pollers[0] and pid_running(pollers[1]) and pid_running(server)
        pool.signal(signal.SIGTERM)
        assert pool.wait(timeout=60) == 0, pool.output()
    finally:
        pool.kill()
