"""Faults a relay meets in production, against real services: pool start must lose nothing."""

from __future__ import annotations

import os
import re
import signal
import socket
import time
from collections import Counter
from urllib.parse import urlsplit

import psycopg
import pytest
import redis

from tests.helpers import (
    PoolProcess,
    amqp_task_ids,
    clean_env,
    redis_messages,
    row_counts,
    run_pool,
    wait_until,
)
from tests.tcp_proxy import TcpProxy


def status(env, cwd) -> dict:
    return row_counts(env, cwd)


def start_pool(env, cwd, workers: int = 2, *extra: str) -> PoolProcess:
    pool = PoolProcess("start", "--workers", str(workers), "--metrics-port", "0", *extra, env=env, cwd=cwd)
    pool.wait_for_line(rf"ready: {workers} pollers")
    return pool


def stop_pool(pool: PoolProcess) -> int:
    pool.signal(signal.SIGTERM)
    try:
        return pool.wait(timeout=60)
    finally:
        pool.kill()


def with_port(url: str, port: int) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    host = f"127.0.0.1:{port}"
    return parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host).geturl()


@pytest.mark.parametrize("broker", ["redis", "amqp"])
def test_broker_outage_marks_nothing_processed_and_relaying_resumes(broker, request, pg_url, queue_name,
                                                                    tmp_path):
    real = request.getfixturevalue("redis_url" if broker == "redis" else "amqp_url")
    upstream = urlsplit(real)
    proxy = TcpProxy(upstream.hostname, upstream.port)
    env = clean_env(PULSE_DB_URL=pg_url, PULSE_BROKER_URL=with_port(real, proxy.port),
                    PULSE_QUEUE=queue_name, PULSE_BATCH_SIZE="50", PULSE_DB_POLL_INTERVAL="0.2")
    assert run_pool("init-db", env=env, cwd=tmp_path).returncode == 0
    pool = start_pool(env, tmp_path)
    try:
        proxy.cut()
        assert run_pool("seed", "--count", "1000", env=env, cwd=tmp_path).returncode == 0
        pool.wait_for_line(r"broker unavailable", timeout=60)
        assert status(env, tmp_path)["processed"] == 0
        proxy.restore()
        wait_until(lambda: status(env, tmp_path)["unprocessed"] == 0, timeout=90,
                   message="relaying to resume after the outage")
        assert status(env, tmp_path) == {"processed": 1000, "unprocessed": 0, "dead": 0}
        pool.wait_for_line(r"broker reachable again")
        assert stop_pool(pool) == 0
    finally:
        pool.kill()
        proxy.close()
    # Logged once per state change and poller, not once per row or batch.
    assert len(re.findall(r"broker unavailable", pool.output())) <= 2
    # The broker was cut before any row was published: a publish then fails to connect, so
    # none is in doubt, and every row goes out exactly once after the restore.
    if broker == "redis":
        ids = Counter(m["id"] for m in redis_messages(real, queue_name))
    else:
        ids = Counter(amqp_task_ids(real, queue_name))
    assert ids == Counter(f"signal-{i}" for i in range(1, 1001))


def test_database_outage_under_load_reconnects_without_crash_loop(pg_url, redis_url, queue_name, tmp_path):
    upstream = urlsplit(pg_url)
    proxy = TcpProxy(upstream.hostname, upstream.port)
    via_proxy = with_port(pg_url, proxy.port)
    env = clean_env(PULSE_DB_URL=via_proxy, PULSE_BROKER_URL=redis_url, PULSE_QUEUE=queue_name,
                    PULSE_BATCH_SIZE="100", PULSE_LEASE_SECONDS="10")
    direct = clean_env(PULSE_DB_URL=pg_url)
    assert run_pool("seed", "--count", "4000", env=direct, cwd=tmp_path).returncode == 0
    pool = start_pool(env, tmp_path, 4)
    try:
        # Read directly, not through `pool status` (a second or more per call): the cut must
        # land while batches are in flight, not after the last one.
        with psycopg.connect(pg_url, autocommit=True) as watch:
            wait_until(lambda: watch.execute("SELECT 1 FROM signals WHERE processed = 1 LIMIT 1").fetchone(),
                       interval=0.005, message="relaying to start")
            proxy.cut()
            cut_at = time.monotonic()
            processed_at_cut, leased_at_cut = watch.execute(
                "SELECT count(*) FILTER (WHERE processed = 1),"
                " count(*) FILTER (WHERE lease_owner IS NOT NULL) FROM signals").fetchone()
        assert processed_at_cut < 4000, "the outage must land under load"
        # Down until every poller has met the outage, not only the first: a blip of a few ms is
        # bridged by the store's one reconnect and tests nothing.
        for index in range(4):
            pool.wait_for_line(rf"poller-{index} .*(database unavailable|database error while settling)",
                               timeout=30)
        proxy.restore()
        outage = time.monotonic() - cut_at
        wait_until(lambda: status(direct, tmp_path)["unprocessed"] == 0, timeout=120,
                   message="all rows relayed after the outage")
        assert stop_pool(pool) == 0
    finally:
        pool.kill()
        proxy.close()
    output = pool.output()
    assert "exited with code" not in output and "Traceback" not in output
    ids = Counter(m["id"] for m in redis_messages(redis_url, queue_name))
    assert set(ids) == {f"signal-{i}" for i in range(1, 4001)}
    # No row goes out twice. A batch published when the database went away is acked once it is
    # back, under the same lease: Poller._until_done retries the ack while the lease surely
    # holds, here some 7.5 s of the 10 s lease, and this outage lasts only until every poller
    # has met it. (An outage longer than that window may publish again at most one batch per
    # poller: the ack gives up, the lease runs out, and another poller claims those rows.)
    twice = sorted(i for i, n in ids.items() if n > 1)
    assert not twice, (f"{len(twice)} rows published more than once after a {outage:.1f} s outage"
                       f" that hit {leased_at_cut} leased rows")
    assert status(direct, tmp_path)["processed"] == 4000


def test_backpressure_pauses_claims_until_a_worker_drains_the_queue(pg_url, redis_url, queue_name,
                                                                   tmp_path):
    env = clean_env(PULSE_DB_URL=pg_url, PULSE_BROKER_URL=redis_url, PULSE_QUEUE=queue_name,
                    PULSE_BATCH_SIZE="20", PULSE_BACKPRESSURE_HIGH="100", PULSE_BACKPRESSURE_LOW="50")
    assert run_pool("seed", "--count", "1000", env=env, cwd=tmp_path).returncode == 0
    pool = start_pool(env, tmp_path, 2)
    worker = None
    try:
        pool.wait_for_line(r"backpressure: queue \S+ holds \d+ messages \(> 100\); pausing claims")
        client = redis.Redis.from_url(redis_url)
        # Paused pollers leave the queue near the mark: at most one batch per poller beyond it.
        depth = client.llen(queue_name)
        assert 100 < depth <= 100 + 2 * 20 + 2 * 20
        assert status(env, tmp_path)["processed"] < 1000
        worker = PoolProcess("worker", "--concurrency", "2", env=env, cwd=tmp_path)
        pool.wait_for_line(r"backpressure released", timeout=120)
        wait_until(lambda: status(env, tmp_path)["unprocessed"] == 0, timeout=180,
                   message="all rows relayed with backpressure on")
        assert stop_pool(pool) == 0
    finally:
        pool.kill()
        if worker is not None:
            worker.signal()
            worker.wait(timeout=60)
            worker.kill()


def test_graceful_shutdown_releases_a_batch_the_broker_never_accepted(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as silent_broker:
        port = silent_broker.getsockname()[1]
        env = clean_env(PULSE_BROKER_URL=f"redis://127.0.0.1:{port}/0", PULSE_LEASE_SECONDS="600")
        assert run_pool("seed", "--count", "10", env=env, cwd=tmp_path).returncode == 0
        pool = start_pool(env, tmp_path, 1, "--shutdown-timeout", "20")
        try:
            wait_until(lambda: leased(tmp_path) > 0, message="a batch in flight")
            code = stop_pool(pool)
        finally:
            pool.kill()
    assert code == 0, pool.output()
    # Released, not left to a 600 s lease: the next poller can claim them at once.
    assert leased(tmp_path) == 0
    assert status(env, tmp_path) == {"processed": 0, "unprocessed": 10, "dead": 0}


def leased(tmp_path) -> int:
    import sqlite3
    from contextlib import closing

    with closing(sqlite3.connect(tmp_path / "pulse_signals.db")) as conn:
        return conn.execute("SELECT COUNT(*) FROM signals WHERE lease_owner IS NOT NULL").fetchone()[0]


@pytest.mark.parametrize("problem, expected", [
    ({"PULSE_DB_TABLE": "no_such_table"}, "table 'no_such_table' not found"),
    ({"PULSE_DB_COLUMN_VALUE": "reading"}, "lacks column(s) reading"),
    ({"PULSE_DB_URL": "postgresql://pulse:s3cret-pw@127.0.0.1:1/pulse"}, "cannot reach database"),
    ({"PULSE_BROKER_URL": "kafka://x"}, "PULSE_BROKER_URL has unsupported scheme"),
    ({"PULSE_DB_TABLE": "signals;drop"}, "PULSE_DB_TABLE must be a plain SQL identifier"),
])
def test_configuration_errors_exit_2_with_one_line_and_no_password(problem, expected, pg_url, tmp_path):
    env = clean_env(PULSE_DB_URL=pg_url)
    assert run_pool("init-db", env=env, cwd=tmp_path).returncode == 0
    result = run_pool("start", "--workers", "2", env={**env, **problem}, cwd=tmp_path, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pool: error:") and expected in lines[0], result.stderr
    assert "s3cret-pw" not in result.stderr + result.stdout


def test_sigkilled_pollers_lose_nothing_and_duplicate_at_most_a_batch_per_kill(pg_url, redis_url,
                                                                               queue_name, tmp_path):
    rows, batch = 20_000, 50
    # A long row lease: a survivor's batch never lapses because a loaded machine held up its
    # heartbeat, so every duplicate is a killed poller's. Its own leases are expired by the test
    # once it is dead, as waiting them out would.
    env = clean_env(PULSE_DB_URL=pg_url, PULSE_BROKER_URL=redis_url, PULSE_QUEUE=queue_name,
                    PULSE_BATCH_SIZE=str(batch), PULSE_LEASE_SECONDS="30")
    assert run_pool("seed", "--count", str(rows), env=env, cwd=tmp_path).returncode == 0
    pool = PoolProcess("start", "--workers", "4", "--metrics-port", "0", env=env, cwd=tmp_path)
    kills = 0
    try:
        pool.wait_for_line(r"ready: 4 pollers")
        killed: dict[int, str] = {}  # pid -> member name
        with psycopg.connect(pg_url, autocommit=True) as conn:
            def a_poller_holding_a_batch() -> tuple[int, str] | None:
                # Which poller holds rows moves with the shard shares: take whichever does now.
                # A row lease's owner is the poller's member name; the members table has its pid.
                owners = conn.execute("SELECT DISTINCT m.pid, m.member FROM signals s"
                                      " JOIN signals_pool_members m ON m.member = s.lease_owner"
                                      " WHERE s.processed = 0").fetchall()
                alive = sorted((pid, member) for pid, member in owners if pid not in killed)
                return alive[0] if alive else None

            def expire_the_killed_pollers_leases() -> None:
                # Again on every look: a claim sent just before a kill may commit after it.
                conn.execute("UPDATE signals SET lease_until = clock_timestamp() WHERE lease_owner = ANY(%s)"
                             " AND processed = 0 AND lease_until > clock_timestamp()",
                             (list(killed.values()),))

            for _ in range(3):
                target, member = wait_until(a_poller_holding_a_batch, timeout=30, interval=0.01,
                                            message="a poller holding a batch")
                os.kill(target, signal.SIGKILL)
                killed[target] = member
                kills += 1
                expire_the_killed_pollers_leases()

            def relayed() -> bool:
                expire_the_killed_pollers_leases()
                return status(env, tmp_path)["unprocessed"] == 0

            wait_until(relayed, timeout=180, message="every row relayed after the kills")
        assert stop_pool(pool) == 0
    finally:
        pool.kill()
    ids = Counter(m["id"] for m in redis_messages(redis_url, queue_name))
    assert set(ids) == {f"signal-{i}" for i in range(1, rows + 1)}
    duplicates = sum(n - 1 for n in ids.values())
    assert duplicates <= kills * batch
    assert len(re.findall(r"exited with code -9", pool.output())) == kills
