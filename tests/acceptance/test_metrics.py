"""The coordinator's one picture of all pollers: scraped totals match the database, through a
poller's death and restart; health, readiness and the status document tell the truth."""

from __future__ import annotations

import json
import os
import re
import signal
import urllib.error
import urllib.request
from collections import Counter

import psycopg

from tests.helpers import PoolProcess, clean_env, run_pool, wait_until

WORKERS = 4


def scrape(port: str) -> tuple[Counter[str], dict[tuple[str, str], float]]:
    """Counter totals summed over workers, and every sample by (name, labels text)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    totals: Counter[str] = Counter()
    samples = {}
    for line in text.splitlines():
        if match := re.match(r"^(\w+)(?:\{([^}]*)\})? ([0-9.e+-]+)$", line):
            samples[(match[1], match[2] or "")] = float(match[3])
            if match[1].endswith("_total"):
                totals[match[1]] += float(match[3])
    return totals, samples


def get(port: str, path: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def processed(pg_url: str) -> int:
    with psycopg.connect(pg_url) as conn:
        return conn.execute("SELECT COUNT(*) FROM signals WHERE processed = 1").fetchone()[0]


def test_scraped_totals_equal_the_database_before_and_after_a_poller_restart(pg_url, redis_url, queue_name,
                                                                            tmp_path):
    metrics_dir = tmp_path / "metrics"
    env = clean_env(PULSE_DB_URL=pg_url, PULSE_BROKER_URL=redis_url, PULSE_QUEUE=queue_name,
                    PROMETHEUS_MULTIPROC_DIR=str(metrics_dir), PULSE_STATUS_INTERVAL="0.3")
    assert run_pool("init-db", env=env, cwd=tmp_path).returncode == 0
    pool = PoolProcess("start", "--workers", str(WORKERS), "--metrics-port", "0", env=env, cwd=tmp_path)
    try:
        victim = int(pool.wait_for_line(r"started poller-2 \(pid (\d+)\)")[1])
        port = pool.wait_for_line(r"ready: 4 pollers, metrics on http://127\.0\.0\.1:(\d+)/metrics")[1]
        assert get(port, "/healthz") == (200, {"status": "ok"})
        # Rows come once the four pollers share the shards, so that each relays a part.
        def shares() -> list[int]:
            return sorted(len(p["shards"]) for p in get(port, "/status.json")[1]["pollers"])

        wait_until(lambda: shares() == [16] * 4, timeout=30, message="the shards shared out")
        assert run_pool("seed", "--count", "4000", env=env, cwd=tmp_path).returncode == 0
        wait_until(lambda: processed(pg_url) == 4000, timeout=120, message="the first 4,000 rows relayed")

        before, samples = scrape(port)
        for name in ("claimed", "published", "acked"):
            assert before[f"pool_signals_{name}_total"] == 4000, (name, before)
        assert before["pool_signals_dead_total"] == 0
        assert {labels for name, labels in samples if name == "pool_poller_pid"} == {
            f'worker="{k}"' for k in range(WORKERS)}
        assert samples[("pool_poller_pid", 'worker="2"')] == victim
        first_life = samples[("pool_signals_acked_total", 'worker="2"')]
        assert first_life > 0

        # Killed while idle: nothing was in flight, so nothing may be counted twice or lost.
        os.kill(victim, signal.SIGKILL)
        pool.wait_for_line(rf"poller-2 \(pid {victim}\) exited with code -9")
        successor = int(pool.wait_for_line(r"poller-2 \(pid (\d+)\) ready again")[1])
        after_restart, samples = scrape(port)
        assert after_restart["pool_signals_acked_total"] == 4000 == processed(pg_url)
        assert samples[("pool_poller_pid", 'worker="2"')] == successor
        # Its successor reopened poller-2's files: the slot's count carries over, not back to 0.
        assert samples[("pool_signals_acked_total", 'worker="2"')] == first_life

        assert run_pool("seed", "--count", "2000", env=env, cwd=tmp_path).returncode == 0
        wait_until(lambda: processed(pg_url) == 6000, timeout=120, message="2,000 more rows relayed")
        # The restarted poller counts on from its predecessor's totals: no drop, no double count.
        wait_until(lambda: scrape(port)[0]["pool_signals_acked_total"] == 6000, timeout=10,
                   message="the last batch's counters")
        final, samples = scrape(port)
        assert final["pool_signals_published_total"] == final["pool_signals_claimed_total"] == 6000
        # Files are per poller slot, not per pid: a restart adds none for every scrape to read.
        assert sorted(f.name for f in metrics_dir.glob("counter_*.db")) == [
            f"counter_poller-{k}.db" for k in range(WORKERS)]
        assert samples[("pool_signals_acked_total", 'worker="2"')] >= first_life

        # The coordinator's own gauges, refreshed on its interval.
        def status() -> dict:
            return get(port, "/status.json")[1]

        def refreshed_after_the_drain() -> dict | None:
            snap = status()  # nobody consumes the queue here: all 6,000 messages wait in it
            done = snap["queue_depth"] == 6000 and snap["backlog"] == 0 and snap["pollers_live"] == WORKERS
            return snap if done else None

        snap = wait_until(refreshed_after_the_drain, timeout=30, message="a status refresh after the drain")
        assert snap["healthy"] and snap["problems"] == [] and snap["dead"] == 0
        assert {p["worker"]: p["pid"] for p in snap["pollers"]}[2] == successor
        assert snap["totals"]["acked"] == 6000
        assert get(port, "/readyz") == (200, {"ready": True, "problems": []})
        _totals, samples = scrape(port)
        assert samples[("pool_backlog_rows", "")] == 0
        assert samples[("pool_pollers_live", "")] == WORKERS
        assert samples[("pool_broker_queue_messages", "")] == 6000

        pool.signal(signal.SIGTERM)
        assert pool.wait(timeout=60) == 0, pool.output()
    finally:
        pool.kill()
    assert "Traceback" not in pool.output()
