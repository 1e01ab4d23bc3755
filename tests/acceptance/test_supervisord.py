"""The repository's supervisord.conf, as it is, under a real supervisord: two `pool poller` programs
and `pool coordinator` relay every row, the coordinator's metrics add up, a poller killed with
SIGKILL is replaced and counts on from its predecessor's totals, and a SIGTERM to supervisord
drains every program cleanly.

The file is copied unchanged into a temporary folder: its paths are relative to `%(here)s`, and
the rest (database, broker, number of pollers, port) comes from supervisord's environment."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from tests.acceptance.test_metrics import get, processed, scrape
from tests.helpers import clean_env, run_pool, wait_until

ROOT = Path(__file__).resolve().parents[2]
ROWS = 3000
MORE = 1000
WORKERS = 2
PROGRAMS = [f"pool-poller-{k}" for k in range(WORKERS)] + ["pool-coordinator"]


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""


def ready_pids(path: Path) -> set[int]:
    """The pids of every `ready: poller-K (pid N)` line of a poller's log."""
    return {int(pid) for pid in re.findall(r"ready: poller-\d+ \(pid (\d+)\)", read(path))}


def wait_for_line(path: Path, pattern: str, supervisord: subprocess.Popen, timeout: float = 60) -> re.Match:
    """A line of a program's log file; fails at once if supervisord itself is gone."""

    def found() -> re.Match | None:
        assert supervisord.poll() is None, f"supervisord exited with {supervisord.returncode}"
        return re.search(pattern, read(path))

    return wait_until(found, timeout=timeout, message=f"{pattern!r} in {path.name}")


def test_supervisord_runs_pollers_and_coordinator_as_programs(pg_url, redis_url, queue_name, tmp_path):
    home = tmp_path / "sv"  # short: the control socket's path must fit in 108 bytes
    home.mkdir()
    conf = home / "supervisord.conf"
    shutil.copyfile(ROOT / "supervisord.conf", conf)
    stale = home / "metrics" / "counter_poller-7.db"  # a file of an earlier run: must not count
    stale.parent.mkdir()
    stale.write_bytes(b"left over")

    bin_dir = str(Path(sys.executable).parent)  # the virtualenv's: `pool` and `supervisord`
    env = clean_env(PULSE_DB_URL=pg_url, PULSE_BROKER_URL=redis_url, PULSE_QUEUE=queue_name,
                    PULSE_WORKERS=str(WORKERS), PULSE_METRICS_PORT="0", PULSE_STATUS_INTERVAL="0.5",
                    PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    assert run_pool("seed", "--count", str(ROWS), env=env, cwd=tmp_path).returncode == 0

    output = tmp_path / "supervisord.out"
    with output.open("w") as sink:
        supervisord = subprocess.Popen(
            [str(ROOT / "scripts" / "run-supervisord.sh"), str(conf)], env=env, cwd=tmp_path,
            stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        ready = r"ready: coordinator, metrics on http://127\.0\.0\.1:(\d+)/metrics"
        port = wait_for_line(home / "pool-coordinator.log", ready, supervisord)[1]
        pids = {k: int(wait_for_line(home / f"pool-poller-{k}.log", rf"ready: poller-{k} \(pid (\d+)\)",
                                     supervisord)[1])
                for k in range(WORKERS)}
        assert not stale.exists()  # the start command wiped the metrics directory

        wait_until(lambda: processed(pg_url) == ROWS, timeout=120, message=f"{ROWS} rows relayed")
        # A poller counts a batch right after its ack: wait for the last one to be counted.
        wait_until(lambda: scrape(port)[0]["pool_signals_acked_total"] == ROWS, timeout=10,
                   message="the acked counters")
        totals, samples = scrape(port)
        assert totals["pool_signals_published_total"] == totals["pool_signals_claimed_total"] == ROWS
        assert totals["pool_signals_dead_total"] == 0
        assert {labels: int(value) for (name, labels), value in samples.items()
                if name == "pool_poller_pid"} == {f'worker="{k}"': pid for k, pid in pids.items()}

        # supervisord replaces a poller that dies; the successor counts on from the slot's files.
        os.kill(pids[1], signal.SIGKILL)
        wait_for_line(home / "supervisord.log", r"exited: pool-poller-1 \(terminated by SIGKILL", supervisord)
        pids[1] = wait_until(lambda: ready_pids(home / "pool-poller-1.log") - {pids[1]}, timeout=60,
                             message="poller-1 ready again").pop()
        assert run_pool("seed", "--count", str(MORE), env=env, cwd=tmp_path).returncode == 0
        wait_until(lambda: processed(pg_url) == ROWS + MORE, timeout=120, message=f"{MORE} more rows relayed")
        wait_until(lambda: scrape(port)[0]["pool_signals_acked_total"] == ROWS + MORE, timeout=10,
                   message="the acked counters after the restart")
        _totals, samples = scrape(port)
        assert samples[("pool_poller_pid", 'worker="1"')] == pids[1]

        wait_until(lambda: get(port, "/readyz")[0] == 200, timeout=30, message="/readyz 200")
        assert get(port, "/readyz") == (200, {"ready": True, "problems": []})
        wait_until(lambda: get(port, "/status.json")[1]["pollers_live"] == WORKERS, timeout=30,
                   message="both pollers live")
        # Standalone there is no `pool start` to reload: the coordinator says so instead of
        # sending SIGHUP to supervisord.
        reload = run_pool("reload", "--url", f"http://127.0.0.1:{port}", env=env, cwd=tmp_path)
        assert reload.returncode == 1 and "supervisorctl restart" in reload.stderr, reload.stderr
        assert supervisord.poll() is None

        supervisord.send_signal(signal.SIGTERM)
        assert supervisord.wait(timeout=90) == 0, read(output)
    finally:
        # On a failure above: supervisord stops its programs on SIGTERM (they are in process
        # groups of their own, out of reach of a kill of supervisord's group).
        if supervisord.poll() is None:
            supervisord.send_signal(signal.SIGTERM)
            try:
                supervisord.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(supervisord.pid, signal.SIGKILL)
                supervisord.wait(timeout=10)

    log = read(home / "supervisord.log")
    for program in PROGRAMS:
        assert f"stopped: {program} (exit status 0)" in log, log
    for k in range(WORKERS):
        lines = read(home / f"pool-poller-{k}.log").splitlines()
        assert lines[-1].endswith("stopped"), lines[-3:]
    assert read(home / "pool-coordinator.log").splitlines()[-1].endswith("stopped")
    for program in PROGRAMS:
        assert "Traceback" not in read(home / f"{program}.log"), program
    # Each poller removed its live gauges on the way out, as `pool start` does for its children.
    assert not list((home / "metrics").glob("gauge_live*"))
    assert processed(pg_url) == ROWS + MORE
