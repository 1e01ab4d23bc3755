"""supervisord.conf as supervisord itself reads it (its own option parser, no process started):
one program per poller slot, the coordinator, a drain-friendly stop, and the shared metrics
directory. tests/acceptance/test_supervisord.py runs it for real."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
from supervisor.options import ServerOptions

from pool.config import Settings

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "run-supervisord.sh"


def load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: str | None) -> ServerOptions:
    """Parse a copy of supervisord.conf in tmp_path, with PULSE_WORKERS as given."""
    conf = tmp_path / "supervisord.conf"
    shutil.copyfile(ROOT / "supervisord.conf", conf)
    if workers is None:
        monkeypatch.delenv("PULSE_WORKERS", raising=False)
    else:
        monkeypatch.setenv("PULSE_WORKERS", workers)
    options = ServerOptions()  # takes ENV_ expansions from os.environ here
    options.configfile = str(conf)
    options.process_config(do_usage=False)
    return options


def programs(options: ServerOptions) -> dict[str, dict[str, Any]]:
    """process name -> its group and settings."""
    return {process.name: {"group": group.name, "config": process}
            for group in options.process_group_configs for process in group.process_configs}


def test_one_poller_program_per_slot_and_the_coordinator(tmp_path: Path, monkeypatch) -> None:
    found = programs(load(tmp_path, monkeypatch, "3"))
    assert set(found) == {*(f"pool-poller-{k}" for k in range(3)), "pool-coordinator", "pool-worker"}
    for k in range(3):
        assert found[f"pool-poller-{k}"]["config"].command == f"pool poller --slot {k}"
        assert found[f"pool-poller-{k}"]["group"] == "pool"
    assert found["pool-coordinator"]["config"].command == "pool coordinator"
    assert found["pool-coordinator"]["group"] == "pool"
    # The reference worker is optional: its own program, outside the pool group, started by hand.
    assert found["pool-worker"]["group"] == "pool-worker"
    assert found["pool-worker"]["config"].command.startswith("pool worker")
    assert not found["pool-worker"]["config"].autostart


def test_numprocs_follows_pulse_workers(tmp_path: Path, monkeypatch) -> None:
    found = programs(load(tmp_path, monkeypatch, "8"))
    assert sorted(name for name in found if name.startswith("pool-poller-")) == sorted(
        f"pool-poller-{k}" for k in range(8))


def test_without_pulse_workers_supervisord_refuses_to_start(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(ValueError, match="ENV_PULSE_WORKERS"):
        load(tmp_path, monkeypatch, None)


def test_every_program_drains_on_stop(tmp_path: Path, monkeypatch) -> None:
    for name, found in programs(load(tmp_path, monkeypatch, "2")).items():
        config = found["config"]
        assert config.stopsignal == signal.SIGTERM, name
        assert config.stopwaitsecs > Settings().shutdown_timeout, name
        assert config.stopasgroup and config.killasgroup, name
        assert config.redirect_stderr, name


def test_logs_per_program_and_paths_beside_the_file(tmp_path: Path, monkeypatch) -> None:
    options = load(tmp_path, monkeypatch, "2")
    found = programs(options)
    logs = [found[name]["config"].stdout_logfile for name in found]
    assert len(set(logs)) == len(logs)
    assert all(Path(log).parent == tmp_path for log in logs)
    assert all(found[name]["config"].directory == str(tmp_path) for name in found)
    supervisord = options.configroot.supervisord
    assert Path(supervisord.logfile).parent == tmp_path
    # Pollers and the coordinator share one metrics directory; the start command wipes it.
    assert supervisord.environment == {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics")}


def run_script(*args: str, workers: str | None, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PULSE_")}
    if workers is not None:
        env["PULSE_WORKERS"] = workers
    return subprocess.run([str(SCRIPT), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=30)


def test_the_start_script_needs_pulse_workers_and_a_config(tmp_path: Path) -> None:
    shutil.copyfile(ROOT / "supervisord.conf", tmp_path / "supervisord.conf")
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "counter_poller-0.db").write_bytes(b"kept: nothing started")
    result = run_script(str(tmp_path / "supervisord.conf"), workers=None, cwd=tmp_path)
    assert result.returncode == 2 and "PULSE_WORKERS" in result.stderr
    result = run_script(str(tmp_path / "missing.conf"), workers="2", cwd=tmp_path)
    assert result.returncode == 2 and "missing.conf" in result.stderr
    assert (tmp_path / "metrics" / "counter_poller-0.db").exists()
