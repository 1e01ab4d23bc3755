"""What an operator sees without SQL: `pool status`, the live status page, `pool reload`, and
automatic pruning, against a running `pool start` on PostgreSQL and Redis."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import psycopg
import pytest

from tests.helpers import PoolProcess, clean_env, run_pool, wait_until

WORKERS = 3
GOOD, POISON = 300, 4


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        return probe.getsockname()[1]


def db_counts(pg_url: str) -> dict[str, int]:
    with psycopg.connect(pg_url) as conn:
        processed = conn.execute("SELECT COUNT(*) FROM signals WHERE processed = 1").fetchone()[0]
        dead = conn.execute("SELECT id FROM signals WHERE dead_at IS NOT NULL ORDER BY dead_at, id")
        dead_ids = [r[0] for r in dead]
    return {"processed": processed, "dead": len(dead_ids), "dead_ids": dead_ids}


def status(env, cwd, *extra: str) -> tuple[int, dict]:
    result = run_pool("status", "--json", *extra, env=env, cwd=cwd)
    assert result.returncode in (0, 1), result.stderr
    return result.returncode, json.loads(result.stdout)


def seed(env, cwd, pg_url: str) -> None:
    assert run_pool("seed", "--count", str(GOOD), env=env, cwd=cwd).returncode == 0
    with psycopg.connect(pg_url) as conn:  # rows no task can be made of: they die at once
        for _ in range(POISON):
            conn.execute("INSERT INTO signals (name, value, source) VALUES (NULL, 1, 'broken-sensor')")


@pytest.fixture
def running(pg_url, redis_url, queue_name, tmp_path):
    """`pool start` with a settings file, a known metrics port and a fast status refresh."""
    config = tmp_path / "pool.toml"
    config.write_text("batch_size = 50\ndb_poll_interval = 0.5\n")
    port = free_port()
    env = clean_env(PULSE_DB_URL=pg_url, PULSE_BROKER_URL=redis_url, PULSE_QUEUE=queue_name,
                    PULSE_CONFIG=str(config), PULSE_METRICS_PORT=str(port), PULSE_STATUS_INTERVAL="0.3",
                    PULSE_MAX_ATTEMPTS="1", PULSE_HOST_ID="status-host")
    seed(env, tmp_path, pg_url)
    pool = PoolProcess("start", "--workers", str(WORKERS), env=env, cwd=tmp_path)
    try:
        pool.wait_for_line(rf"ready: {WORKERS} pollers, metrics on http://127\.0\.0\.1:{port}/metrics")
        wait_until(lambda: status(env, tmp_path)[1]["unprocessed"] == 0, timeout=60,
                   message="a drained table")
        yield pool, env, config, port
    finally:
        pool.kill()


def test_pool_status_shows_pollers_backlog_dead_rows_and_exits_by_health(running, pg_url, tmp_path):
    pool, env, _config, port = running
    truth = db_counts(pg_url)
    assert truth["processed"] == GOOD and truth["dead"] == POISON

    def settled() -> dict | None:
        code, report = status(env, tmp_path)
        snap = report["status"]
        done = code == 0 and snap and snap["dead"] == POISON and snap["backlog"] == 0
        # The first poller up takes every shard; the others get their shares within seconds.
        balanced = done and sorted(len(p["shards"]) for p in snap["pollers"]) == [21, 21, 22]
        return report if balanced else None

    report = wait_until(settled, timeout=30, message="a healthy, balanced status after the drain")
    assert (report["processed"], report["unprocessed"], report["dead"]) == (GOOD, 0, POISON)
    snap = report["status"]
    assert snap["pollers_live"] == WORKERS and snap["problems"] == []
    # 64 shards shared out by lease: all held, near-equal shares, each by one poller.
    held = [p["shards"] for p in snap["pollers"]]
    assert sorted(s for shards in held for s in shards) == list(range(64))
    assert sorted(len(shards) for shards in held) == [21, 21, 22]
    assert snap["hosts"] == [{"host": "status-host", "pollers": WORKERS, "shards": 64}]
    assert all(p["batch_size"] == 50 and p["poll_interval"] == 0.5 for p in snap["pollers"])
    assert snap["queue_depth"] == GOOD  # nobody consumes the queue in this test
    assert [d["id"] for d in snap["dead_letters"]] == [str(i) for i in truth["dead_ids"]]  # ids as text
    assert all("name is NULL" in d["last_error"] for d in snap["dead_letters"])

    text = run_pool("status", env=env, cwd=tmp_path)
    assert text.returncode == 0, text.stderr
    assert text.stdout.startswith("pool: healthy\n")
    assert f"rows: {GOOD:,} processed, 0 unprocessed, {POISON} dead" in text.stdout
    assert f"pollers on this host (status-host): {WORKERS} of {WORKERS} live" in text.stdout
    assert "shards: 64 of 64 held; hosts: status-host (3 pollers, 64 shards)" in text.stdout
    assert re.search(r"^  poller-1 +\d+ +2[12] +running ", text.stdout, re.M), text.stdout

    pool.signal(signal.SIGTERM)
    assert pool.wait(timeout=60) == 0
    stopped = run_pool("status", env=env, cwd=tmp_path)
    assert stopped.returncode == 1
    assert stopped.stdout.startswith("pool: UNHEALTHY: no coordinator answers at")
    assert f"rows: {GOOD:,} processed" in stopped.stdout  # the database still answers


def test_reload_passes_new_settings_to_running_pollers_and_keeps_them_on_a_bad_file(running, tmp_path):
    pool, env, config, port = running

    def batch_sizes() -> set[int]:
        # From the coordinator itself: `pool status` reads the (soon broken) settings file too.
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status.json", timeout=10) as response:
            return {p["batch_size"] for p in json.loads(response.read())["pollers"]}

    wait_until(lambda: batch_sizes() == {50}, timeout=30, message="the first settings in status")
    config.write_text("batch_size = 7\ndb_poll_interval = 0.25\nlog_level = \"DEBUG\"\n")
    reloaded = run_pool("reload", env=env, cwd=tmp_path)
    assert reloaded.returncode == 0, reloaded.stderr
    assert f"asked the pool at http://127.0.0.1:{port} to reload" in reloaded.stdout
    pool.wait_for_line(r"reloaded: .*batch_size 50 -> 7")
    wait_until(lambda: batch_sizes() == {7}, timeout=30, message="the reloaded batch size in pool status")
    code, report = status(env, tmp_path)
    assert code == 0 and {p["poll_interval"] for p in report["status"]["pollers"]} == {0.25}

    # A broken file is refused as a whole; SIGHUP works like `pool reload`.
    config.write_text("batch_size = \"lots\"\n")
    pool.signal(signal.SIGHUP)
    pool.wait_for_line(r"reload failed, keeping the current settings: PULSE_BATCH_SIZE must be an integer")
    assert batch_sizes() == {7}
    # What cannot change at run time is named; flags (here --workers) still beat the file.
    config.write_text("batch_size = 7\nlease_seconds = 30\nworkers = 5\n")
    pool.signal(signal.SIGHUP)
    pool.wait_for_line(r"reload: lease_seconds changed but only take effect when pool start is restarted")
    assert "workers changed" not in pool.output()
    pool.signal(signal.SIGTERM)
    assert pool.wait(timeout=60) == 0, pool.output()


class _Text(HTMLParser):
    """Text by element id, and the table rows (data-* attributes) the page rendered."""

    def __init__(self) -> None:
        super().__init__()
        self.by_id: dict[str, str] = {}
        self.rows: dict[str, list[dict[str, str]]] = {}
        self._open: list[str | None] = []
        self._table: str | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        attributes = dict(attrs)
        if tag == "table":
            self._table = attributes.get("id")
        if tag == "tr" and self._table and any(k.startswith("data-") for k in attributes):
            self.rows.setdefault(self._table, []).append(
                {k.removeprefix("data-"): v for k, v in attributes.items() if k.startswith("data-")}
                | {"class": attributes.get("class") or ""})
        self._open.append(attributes.get("id"))

    def handle_endtag(self, tag: str) -> None:
        if self._open:
            self._open.pop()

    def handle_data(self, data: str) -> None:
        for element in reversed(self._open):
            if element:
                self.by_id[element] = self.by_id.get(element, "") + data
                break


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.environ.get("CI") == "true":
        pytest.fail("chromium is not installed (CI=true); ./scripts/test.sh installs it with apt-get")
    pytest.skip("chromium is not installed: apt-get install chromium to run the status page test")


def browse(url: str, *action: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         "--window-size=1400,1000", "--virtual-time-budget=5000", *action, url],
        capture_output=True, text=True, timeout=120,
    )


def test_status_page_shows_the_running_pool_in_a_browser(running, pg_url, tmp_path):
    _pool, env, _config, port = running
    wait_until(lambda: status(env, tmp_path)[1]["status"]["dead"] == POISON, timeout=30,
               message="the dead rows in the status")
    truth = db_counts(pg_url)
    url = f"http://127.0.0.1:{port}/"

    dom = browse(url, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = _Text()
    page.feed(dom.stdout)
    assert page.by_id["health"] == "healthy", dom.stdout
    assert page.by_id["backlog"] == "0"
    assert page.by_id["dead"] == str(truth["dead"])
    assert page.by_id["pollers-live"] == f"{WORKERS} / {WORKERS}"
    assert page.by_id["acked-total"] == f"{truth['processed']:,}"
    assert page.by_id["queue-depth"] == f"{GOOD:,}"
    assert [r["worker"] for r in page.rows["pollers"]] == [str(k) for k in range(WORKERS)]
    assert not any(r["class"] == "down" for r in page.rows["pollers"])
    assert [int(r["row"]) for r in page.rows["dead-letters"]] == truth["dead_ids"]

    shot = Path(tmp_path) / "status.png"
    taken = browse(url, f"--screenshot={shot}")
    assert taken.returncode == 0, taken.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000  # a drawn page, not a blank one


def test_the_coordinator_prunes_old_processed_rows_when_told_to(pg_url, redis_url, queue_name, tmp_path):
    env = clean_env(PULSE_DB_URL=pg_url, PULSE_BROKER_URL=redis_url, PULSE_QUEUE=queue_name,
                    PULSE_PRUNE_PROCESSED_AFTER="1h")
    assert run_pool("seed", "--count", "30", env=env, cwd=tmp_path).returncode == 0
    with psycopg.connect(pg_url) as conn:
        conn.execute("UPDATE signals SET processed = 1, timestamp = now() - interval '2 hours'"
                     " WHERE id <= 20")
        conn.execute("UPDATE signals SET processed = 1, timestamp = now() WHERE id > 20 AND id <= 25")
    pool = PoolProcess("start", "--workers", "1", "--metrics-port", "0", env=env, cwd=tmp_path)
    try:
        pool.wait_for_line(r"pruned 20 processed rows older than 1h")
        with psycopg.connect(pg_url) as conn:
            left = [r[0] for r in conn.execute("SELECT id FROM signals ORDER BY id")]
        assert left == list(range(21, 31))  # recent processed rows and pending rows stay
        pool.signal(signal.SIGTERM)
        assert pool.wait(timeout=60) == 0
    finally:
        pool.kill()


BEYOND_DOUBLES = 2**53 + 1  # 9007199254740993: a JavaScript number reads it as ...992


def test_a_row_id_above_2_53_is_shown_exactly_on_the_page_and_in_status_json(running, pg_url, tmp_path):
    _pool, env, _config, port = running
    with psycopg.connect(pg_url) as conn:  # a dead letter with an id no double can hold
        conn.execute("INSERT INTO signals (id, name, value, source) VALUES (%s, NULL, 1, 'big-id')",
                     (BEYOND_DOUBLES,))

    def dead_ids() -> list:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status.json", timeout=10) as response:
            return [d["id"] for d in json.loads(response.read())["dead_letters"]]

    ids = wait_until(lambda: (ids := dead_ids()) and len(ids) == POISON + 1 and ids, timeout=30,
                     message="the big id among the dead letters")
    # What an operator copies from the page must name the row for `pool dead requeue --id`.
    dom = browse(f"http://127.0.0.1:{port}/", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = _Text()
    page.feed(dom.stdout)
    assert str(BEYOND_DOUBLES) in [r["row"] for r in page.rows["dead-letters"]]
    assert f"<td>{BEYOND_DOUBLES}</td>" in dom.stdout
    assert str(BEYOND_DOUBLES) in ids and all(isinstance(i, str) for i in ids)
    requeued = run_pool("dead", "requeue", "--id", str(BEYOND_DOUBLES), env=env, cwd=tmp_path)
    assert requeued.returncode == 0 and "requeued 1 dead row(s)" in requeued.stdout, requeued.stderr
