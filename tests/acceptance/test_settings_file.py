"""A settings file gone bad while `pool start` runs: the reload is refused in one line and the
supervisor goes on supervising (it once died on a non-UTF-8 file and left its pollers orphaned)."""

from __future__ import annotations

import signal

from tests.helpers import PoolProcess, clean_env, row_counts, run_pool, wait_until


def test_a_reload_of_a_file_that_is_not_utf8_keeps_the_settings_and_the_supervisor(tmp_path):
    config = tmp_path / "pool.toml"
    config.write_text("batch_size = 50\n")
    env = clean_env(PULSE_CONFIG=str(config))
    assert run_pool("init-db", env=env, cwd=tmp_path).returncode == 0
    pool = PoolProcess("start", "--workers", "1", "--metrics-port", "0", env=env, cwd=tmp_path)
    try:
        pool.wait_for_line(r"ready: 1 pollers")
        config.write_bytes(b"batch_size = 60\n# caf\xe9 in Latin-1\n")
        pool.signal(signal.SIGHUP)
        pool.wait_for_line(r"reload failed, keeping the current settings: PULSE_CONFIG: .* is not UTF-8")
        # A directory where the file was is refused alike.
        config.unlink()
        config.mkdir()
        pool.signal(signal.SIGHUP)
        pool.wait_for_line(r"reload failed, keeping the current settings: PULSE_CONFIG: cannot read .*: Is a")
        config.rmdir()
        # Still supervising: the next good file is applied, and rows still flow.
        config.write_text("batch_size = 70\n")
        pool.signal(signal.SIGHUP)
        pool.wait_for_line(r"reloaded: batch_size 50 -> 70")
        assert run_pool("seed", "--count", "100", env=env, cwd=tmp_path).returncode == 0
        wait_until(lambda: row_counts(env, tmp_path)["unprocessed"] == 0, timeout=60,
                   message="rows relayed after the refused reloads")
        pool.signal(signal.SIGTERM)
        assert pool.wait(timeout=60) == 0, pool.output()
    finally:
        pool.kill()
    assert "Traceback" not in pool.output()
