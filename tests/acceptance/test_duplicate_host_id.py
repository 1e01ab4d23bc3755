"""Two `pool start` under one host id (two containers with one hostname, or one PULSE_HOST_ID
given twice) against one table on PostgreSQL and Redis: four processes are four members, every
row is relayed, and both coordinators show four live pollers and name the clash. A poller killed
and restarted by its `pool start` takes over its predecessor's membership and shards at once,
rather than leaving a ghost that holds them until its lease runs out."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
import urllib.error
import urllib.request
from collections import Counter

import psycopg

from tests.helpers import PoolProcess, clean_env, redis_messages, run_pool, wait_until

HOST = "same"
WORKERS = 2
SHARDS = 64
ROWS = 20_000
# Long, so that a killed poller's shards waiting out their lease cannot pass for a hand-over.
SHARD_LEASE = 30.0


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        return probe.getsockname()[1]


def pending(pg_url: str) -> int:
    with psycopg.connect(pg_url) as conn:
        sql = "SELECT COUNT(*) FROM signals WHERE processed = 0 AND dead_at IS NULL"
        return conn.execute(sql).fetchone()[0]


def members(pg_url: str) -> list[str]:
    with psycopg.connect(pg_url) as conn:
        return [r[0] for r in conn.execute("SELECT member FROM signals_pool_members ORDER BY member")]


def shard_owners(pg_url: str) -> Counter[str]:
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute("SELECT owner FROM signals_pool_shards WHERE expires_at > clock_timestamp()")
        return Counter(owner for (owner,) in rows if owner)


def status(env: dict, cwd) -> tuple[int, dict]:
    result = run_pool("status", "--json", env=env, cwd=cwd)
    assert result.returncode in (0, 1), result.stderr
    return result.returncode, json.loads(result.stdout)


def readyz(port: int) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def names_the_duplicate(problems: list[str]) -> bool:
    return any(p.startswith(f"host {HOST}: 2 processes claim poller-0 (pids ") and "2 claim poller-1" in p
               for p in problems)


def test_two_pool_starts_with_one_host_id_are_four_members_relay_everything_and_are_named(
        pg_url, redis_url, queue_name, tmp_path):
    base = clean_env(PULSE_DB_URL=pg_url, PULSE_BROKER_URL=redis_url, PULSE_QUEUE=queue_name,
                     PULSE_SHARD_LEASE_SECONDS=str(SHARD_LEASE), PULSE_BACKPRESSURE_HIGH="0",
                     PULSE_STATUS_INTERVAL="0.3", PULSE_BATCH_SIZE="100")
    assert run_pool("init-db", env=base, cwd=tmp_path).returncode == 0
    assert run_pool("seed", "--count", str(ROWS), env=base, cwd=tmp_path).returncode == 0
    envs = {}
    for name in ("a", "b"):
        (tmp_path / f"metrics-{name}").mkdir()
        envs[name] = {**base, "PULSE_METRICS_PORT": str(free_port()),
                      "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / f"metrics-{name}")}
    pools = {name: PoolProcess("start", "--workers", str(WORKERS), "--host-id", HOST, env=env, cwd=tmp_path)
             for name, env in envs.items()}
    try:
        for pool in pools.values():
            pool.wait_for_line(rf"ready: {WORKERS} pollers")
        # Four processes, four members, each with a share of its own: no shard unowned, and
        # none held by two processes that believe they are one member.
        wait_until(lambda: sorted(shard_owners(pg_url).values()) == [16] * 4, timeout=30,
                   message="64 shards shared by four members")
        assert len(members(pg_url)) == 4
        wait_until(lambda: pending(pg_url) == 0, timeout=120, message="every row relayed")

        for name, env in envs.items():
            def shows_the_truth(env: dict = env) -> dict | None:
                code, report = status(env, tmp_path)
                snap = report["status"]
                truth = snap and snap["hosts"] == [{"host": HOST, "pollers": 4, "shards": SHARDS}] \
                    and snap["host_pollers_live"] == 4 and names_the_duplicate(report["problems"]) \
                    and [len(p["shards"]) for p in snap["pollers"]] == [SHARDS // 4] * WORKERS
                return report if code == 1 and truth else None

            report = wait_until(shows_the_truth, timeout=30, message=f"coordinator {name}: 4 pollers named")
            assert [(d["slot"], d["processes"]) for d in report["status"]["duplicates"]] == [
                ("poller-0", 2), ("poller-1", 2)]
            text = run_pool("status", env=env, cwd=tmp_path)
            assert text.returncode == 1
            assert f"pool: UNHEALTHY: host {HOST}: 2 processes claim poller-0" in text.stdout
            assert f"{HOST} (4 pollers, {SHARDS} shards)" in text.stdout
            assert f"4 live under host id {HOST} in all" in text.stdout
            # Still ready: every process relays a share of its own; the body says what is wrong.
            code, body = readyz(int(env["PULSE_METRICS_PORT"]))
            assert code == 200 and body["ready"] and names_the_duplicate(body["problems"])

        # A poller killed from outside is restarted by its pool start; the new process replaces
        # the old member at its first sync instead of waiting SHARD_LEASE seconds for its leases.
        slot_file = tmp_path / "metrics-a" / "poller-0.member"
        killed_member, killed_pid = slot_file.read_text().split()
        os.kill(int(killed_pid), signal.SIGKILL)
        killed_at = time.monotonic()
        pools["a"].wait_for_line(r"poller-0 \(pid \d+\) ready again")

        def replaced() -> bool:
            owners = shard_owners(pg_url)
            current = members(pg_url)
            return (killed_member not in current and len(current) == 4 and killed_member not in owners
                    and sum(owners.values()) == SHARDS and len(owners) == 4)

        wait_until(replaced, timeout=SHARD_LEASE / 2, interval=0.05,
                   message="the restarted poller in the killed one's place")
        took = time.monotonic() - killed_at
        print(f"\nrestarted poller took over from its killed predecessor in {took:.2f} s")
        assert slot_file.read_text().split()[0] != killed_member

        for name, pool in pools.items():
            pool.signal(signal.SIGTERM)
            assert pool.wait(timeout=60) == 0, f"{name}:\n{pool.output()}"
    finally:
        for pool in pools.values():
            pool.kill()

    ids = Counter(m["id"] for m in redis_messages(redis_url, queue_name))
    assert set(ids) == {f"signal-{i}" for i in range(1, ROWS + 1)}  # nothing lost
    # Graceful stops hand everything back.
    assert members(pg_url) == [] and shard_owners(pg_url) == Counter()


def test_a_second_pool_start_on_a_metrics_folder_in_use_is_refused_and_erases_nothing(
        pg_url, redis_url, queue_name, tmp_path):
    folder = tmp_path / "metrics"
    folder.mkdir()
    env = clean_env(PULSE_DB_URL=pg_url, PULSE_BROKER_URL=redis_url, PULSE_QUEUE=queue_name,
                    PULSE_METRICS_PORT="0", PROMETHEUS_MULTIPROC_DIR=str(folder))
    assert run_pool("init-db", env=env, cwd=tmp_path).returncode == 0
    first = PoolProcess("start", "--workers", "1", env=env, cwd=tmp_path)
    try:
        first.wait_for_line(r"ready: 1 pollers")
        files = sorted(os.listdir(folder))
        second = run_pool("start", "--workers", "1", env=env, cwd=tmp_path, timeout=60)
        assert second.returncode == 2, second.stderr
        lines = second.stderr.strip().splitlines()
        expected = (f"pool: error: PROMETHEUS_MULTIPROC_DIR: pool-start already runs with metrics folder"
                    f" {folder} (pid {first.proc.pid}); give each pool start its own folder")
        assert lines[-1] == expected, second.stderr
        assert "Traceback" not in second.stderr
        assert set(files) <= set(os.listdir(folder))  # the first pool's metrics are still there
        first.signal(signal.SIGTERM)
        assert first.wait(timeout=60) == 0, first.output()
    finally:
        first.kill()


def test_a_second_standalone_poller_in_a_taken_slot_is_refused_and_leaves_the_first_alone(
        pg_url, redis_url, queue_name, tmp_path):
    """Two `pool poller --slot 0` programs with one metrics folder (a supervisord config that names
    a slot twice) would write the same metric files; the second says so and exits 2."""
    folder = tmp_path / "metrics"
    folder.mkdir()
    env = clean_env(PULSE_DB_URL=pg_url, PULSE_BROKER_URL=redis_url, PULSE_QUEUE=queue_name,
                    PULSE_WORKERS="2", PROMETHEUS_MULTIPROC_DIR=str(folder))
    assert run_pool("init-db", env=env, cwd=tmp_path).returncode == 0
    first = PoolProcess("poller", "--slot", "0", env=env, cwd=tmp_path)
    second = None
    try:
        pid = first.wait_for_line(r"ready: poller-0 \(pid (\d+)\)")[1]
        live_gauges = sorted(p.name for p in folder.glob("gauge_live*_poller-0.db"))
        assert live_gauges
        second = PoolProcess("poller", "--slot", "0", env=env, cwd=tmp_path)
        assert second.wait(timeout=30) == 2, second.output()
        assert second.lines[-1] == (
            f"pool: error: poller-0 already runs with metrics folder {folder} (pid {pid}): give each poller"
            " its own --slot, and each pool start its own PROMETHEUS_MULTIPROC_DIR"), second.output()
        # The first one's heartbeat and pid gauges are still there for the coordinator to read.
        assert sorted(p.name for p in folder.glob("gauge_live*_poller-0.db")) == live_gauges, first.output()
        first.signal(signal.SIGTERM)
        assert first.wait(timeout=60) == 0, first.output()
    finally:
        first.kill()
        if second is not None:
            second.kill()


def test_a_pool_start_killed_outright_and_started_again_takes_over_at_once(pg_url, redis_url, queue_name,
                                                                           tmp_path):
    """The whole process group SIGKILLed (a container stopped hard) and started again on the same
    metrics folder: the slot files name the old members, so the new pollers replace them at once
    instead of waiting SHARD_LEASE seconds for their leases (as before member names had nonces)."""
    folder = tmp_path / "metrics"
    folder.mkdir()
    env = clean_env(PULSE_DB_URL=pg_url, PULSE_BROKER_URL=redis_url, PULSE_QUEUE=queue_name,
                    PULSE_METRICS_PORT="0", PROMETHEUS_MULTIPROC_DIR=str(folder),
                    PULSE_SHARD_LEASE_SECONDS=str(SHARD_LEASE))
    assert run_pool("init-db", env=env, cwd=tmp_path).returncode == 0
    first = PoolProcess("start", "--workers", str(WORKERS), "--host-id", HOST, env=env, cwd=tmp_path)
    second = None
    try:
        first.wait_for_line(rf"ready: {WORKERS} pollers")
        wait_until(lambda: sum(shard_owners(pg_url).values()) == SHARDS, timeout=30, message="shards held")
        old = set(members(pg_url))
        first.kill()
        killed_at = time.monotonic()
        second = PoolProcess("start", "--workers", str(WORKERS), "--host-id", HOST, env=env, cwd=tmp_path)
        second.wait_for_line(rf"ready: {WORKERS} pollers")

        def replaced() -> bool:
            owners, current = shard_owners(pg_url), set(members(pg_url))
            return len(current) == WORKERS and not current & old and sum(owners.values()) == SHARDS \
                and not set(owners) & old

        wait_until(replaced, timeout=SHARD_LEASE / 2, interval=0.05, message="the old members replaced")
        print(f"\nnew pool start took over from the killed one in {time.monotonic() - killed_at:.2f} s")
        second.signal(signal.SIGTERM)
        assert second.wait(timeout=60) == 0, second.output()
    finally:
        first.kill()
        if second is not None:
            second.kill()
