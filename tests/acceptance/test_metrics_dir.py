"""`pool start` deletes only its own files from PROMETHEUS_MULTIPROC_DIR: the folder may be shared.
A folder holding other metric files (which every scrape would add to pool's) is refused."""

from __future__ import annotations

import signal

from tests.helpers import PoolProcess, clean_env, run_pool


def test_pool_start_deletes_only_its_own_files_from_a_shared_metrics_folder(tmp_path):
    shared = tmp_path / "shared"
    (shared / "someone-else").mkdir(parents=True)
    (shared / "someone-else" / "data.txt").write_text("keep me")
    (shared / "notes.txt").write_text("keep me too")
    (shared / "counter_poller-5.db").write_bytes(b"a file of an earlier run")
    env = clean_env(PROMETHEUS_MULTIPROC_DIR=str(shared))
    assert run_pool("init-db", env=env, cwd=tmp_path).returncode == 0
    pool = PoolProcess("start", "--workers", "1", "--metrics-port", "0", env=env, cwd=tmp_path)
    try:
        pool.wait_for_line(r"ready: 1 pollers")
        assert (shared / "someone-else" / "data.txt").read_text() == "keep me"
        assert (shared / "notes.txt").read_text() == "keep me too"
        assert not (shared / "counter_poller-5.db").exists()
        assert (shared / "counter_poller-0.db").exists()  # the running poller's own
        pool.signal(signal.SIGTERM)
        assert pool.wait(timeout=60) == 0, pool.output()
    finally:
        pool.kill()
    assert (shared / "someone-else" / "data.txt").exists() and (shared / "notes.txt").exists()


def test_a_metrics_folder_with_other_metric_files_is_refused_in_one_line(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "counter_4242.db").write_bytes(b"another program's counters")
    env = clean_env(PROMETHEUS_MULTIPROC_DIR=str(shared))
    assert run_pool("init-db", env=env, cwd=tmp_path).returncode == 0
    for command in (("start", "--workers", "1", "--metrics-port", "0"), ("poller", "--slot", "0"),
                    ("coordinator", "--metrics-port", "0")):
        result = run_pool(*command, env=env, cwd=tmp_path, timeout=60)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "holds metric files that are not pool's (counter_4242.db)" in lines[0]
        assert (shared / "counter_4242.db").read_bytes() == b"another program's counters"
