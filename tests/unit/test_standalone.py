"""`pool poller --slot K` and `pool coordinator` on their own, without services: SQLite and the
filesystem broker. Their configuration errors, the reporters, and the coordinator's answer to a
reload it cannot do."""

from __future__ import annotations

import http.server
import logging
import os
import re
import signal
import socket
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from pool.coordinator import CoordinatorApp
from pool.errors import ConfigError
from pool.process_main import LogReporter, PipeReporter, as_reporter
from pool.status import StatusMonitor
from pool.status_client import request_reload
from tests.acceptance.test_metrics import get
from tests.helpers import PoolProcess, clean_env, run_pool, wait_until
from tests.unit.test_status import POOL_CLIENT, FakeDepth, FakeStore, call, settings


def assert_one_error_line(result, *needles: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pool: error:"), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return clean_env(PULSE_DB_URL=f"sqlite:///{tmp_path / 'signals.db'}", PULSE_BROKER_URL="filesystem://",
                     PULSE_BROKER_FOLDER=str(tmp_path / "broker"),
                     PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "metrics"))


# --- configuration errors: one line, exit 2, before any work ---------------------------------


@pytest.mark.parametrize("command", [["poller", "--slot", "0"], ["coordinator"]])
def test_refuses_to_run_without_the_shared_metrics_directory(tmp_path: Path, env, command) -> None:
    del env["PROMETHEUS_MULTIPROC_DIR"]
    line = assert_one_error_line(run_pool(*command, env=env, cwd=tmp_path),
                                 "PROMETHEUS_MULTIPROC_DIR", "supervisord's environment")
    assert f"pool {command[0]}" in line
    assert not (tmp_path / "signals.db").exists()


@pytest.mark.parametrize(("slot", "workers", "needle"), [
    ("2", "2", "--slot must be between 0 and 1 (PULSE_WORKERS or --workers is 2), got 2"),
    ("1", "1", "--slot must be between 0 and 0"),
    ("-1", "4", "--slot must be between 0 and"),
    ("one", "4", "--slot must be a whole number"),
])
def test_slot_must_be_one_of_the_hosts_pollers(tmp_path: Path, env, slot, workers, needle) -> None:
    result = run_pool("poller", f"--slot={slot}", env={**env, "PULSE_WORKERS": workers}, cwd=tmp_path)
    assert_one_error_line(result, needle)
    assert not (tmp_path / "signals.db").exists()


def test_slot_is_required(tmp_path: Path, env) -> None:
    result = run_pool("poller", env=env, cwd=tmp_path)
    assert result.returncode == 2 and "--slot" in result.stderr


@pytest.mark.parametrize("command", [["poller", "--slot", "0"], ["coordinator"]])
def test_an_unprepared_database_is_refused_as_by_pool_start(tmp_path: Path, env, command) -> None:
    assert_one_error_line(run_pool(*command, env=env, cwd=tmp_path), "pool init-db")


def test_coordinator_on_a_taken_port_is_one_line(tmp_path: Path, env) -> None:
    assert run_pool("init-db", env=env, cwd=tmp_path).returncode == 0
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        result = run_pool("coordinator", env={**env, "PULSE_METRICS_PORT": port}, cwd=tmp_path)
    assert_one_error_line(result, f"cannot serve metrics on 127.0.0.1:{port}", "PULSE_METRICS_PORT")


@pytest.mark.parametrize("command", [["poller", "--slot", "0"], ["coordinator"]])
def test_an_unreachable_database_is_one_line_without_the_password(tmp_path: Path, env, command) -> None:
    result = run_pool(*command, "--db-url", "postgresql://u:hunter2@127.0.0.1:1/db", env=env, cwd=tmp_path)
    line = assert_one_error_line(result, "127.0.0.1")
    assert "hunter2" not in result.stdout + result.stderr, line


@pytest.mark.parametrize(("command", "flags"), [
    ("poller", ["--slot", "PULSE_WORKERS", "--workers", "--batch-size", "--shutdown-timeout", "--db-url"]),
    ("coordinator", ["--workers", "--metrics-port", "--metrics-host", "--db-url", "--log-format"]),
])
def test_help_names_the_flags_and_the_metrics_directory(tmp_path: Path, env, command, flags) -> None:
    result = run_pool(command, "--help", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for flag in [*flags, "PROMETHEUS_MULTIPROC_DIR"]:
        assert flag in result.stdout, flag
    assert "--metrics-port" not in result.stdout or command == "coordinator"
    listing = run_pool("--help", env=env, cwd=tmp_path).stdout
    assert re.search(rf"^\s+{command}\s", listing, re.MULTILINE)


# --- a poller and the coordinator, end to end on SQLite -------------------------------------------


def processed(tmp_path: Path) -> int:
    with sqlite3.connect(tmp_path / "signals.db") as conn:
        return conn.execute("SELECT COUNT(*) FROM signals WHERE processed = 1").fetchone()[0]


def test_a_standalone_poller_relays_the_rows_and_drains_on_sigterm(tmp_path: Path, env) -> None:
    env = {**env, "PULSE_WORKERS": "1", "PULSE_METRICS_PORT": "0", "PULSE_STATUS_INTERVAL": "0.2"}
    assert run_pool("seed", "--count", "400", env=env, cwd=tmp_path).returncode == 0
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    # Live gauges that a killed predecessor in this slot left behind: the poller removes them.
    (metrics / "gauge_livemax_poller-0.db").write_bytes(b"predecessor")

    poller = PoolProcess("poller", "--slot", "0", env=env, cwd=tmp_path)
    coordinator = None
    try:
        pid = int(poller.wait_for_line(r"poller-0 .*ready: poller-0 \(pid (\d+)\)")[1])
        assert pid == poller.proc.pid
        assert (metrics / "gauge_livemax_poller-0.db").read_bytes() != b"predecessor"
        coordinator = PoolProcess("coordinator", env=env, cwd=tmp_path)
        port = coordinator.wait_for_line(r"ready: coordinator, metrics on http://127\.0\.0\.1:(\d+)/metrics")[1]
        wait_until(lambda: processed(tmp_path) == 400, timeout=60, message="400 rows relayed")
        assert len(list((tmp_path / "broker").glob("*.msg"))) == 400

        def status() -> dict:
            return get(port, "/status.json")[1]

        wait_until(lambda: status()["totals"]["acked"] == 400, timeout=30, message="the coordinator's totals")
        wait_until(lambda: status()["healthy"], timeout=30, message="a healthy status")
        assert status()["pollers_live"] == 1

        poller.signal(signal.SIGTERM)
        assert poller.wait(timeout=60) == 0, poller.output()
        coordinator.signal(signal.SIGTERM)
        assert coordinator.wait(timeout=60) == 0, coordinator.output()
    finally:
        poller.kill()
        if coordinator is not None:
            coordinator.kill()
    assert poller.lines[-1].endswith("stopped") and coordinator.lines[-1].endswith("stopped")
    assert "Traceback" not in poller.output() + coordinator.output()
    assert not list(metrics.glob("gauge_live*"))  # shown live no longer
    assert (metrics / "counter_poller-0.db").exists()  # its totals stay for its successor


# --- reporters and reload ------------------------------------------------------------------


def test_log_reporter_logs_ready_and_turns_fatal_into_a_config_error(caplog) -> None:
    reporter = LogReporter()
    assert not reporter.supervised
    with caplog.at_level(logging.INFO, logger="pool.process_main"):
        reporter.ready("poller-3")
        reporter.ready("coordinator", 9200, "coordinator, metrics on http://127.0.0.1:9200/metrics")
    assert caplog.messages == [f"ready: poller-3 (pid {os.getpid()})",
                               "ready: coordinator, metrics on http://127.0.0.1:9200/metrics"]
    with pytest.raises(ConfigError, match="port taken"):
        reporter.fatal("coordinator", "port taken")
    reporter.on_reload(lambda changes: pytest.fail("no reloads standalone"))
    assert as_reporter(reporter) is reporter


def test_pipe_reporter_speaks_the_supervisors_protocol() -> None:
    import multiprocessing

    ours, theirs = multiprocessing.Pipe(duplex=True)
    reporter = as_reporter(theirs)
    assert isinstance(reporter, PipeReporter) and reporter.supervised
    reporter.ready("coordinator", 9200, "ignored: the supervisor logs its own ready line")
    reporter.fatal("coordinator", "port taken")
    assert ours.recv() == ("ready", "coordinator", os.getpid(), 9200)
    assert ours.recv() == ("fatal", "coordinator", os.getpid(), "port taken")
    applied, gone = threading.Event(), threading.Event()
    reporter.on_reload(lambda changes: applied.set() if changes == {"batch_size": 7} else None,
                       parent_gone=gone.set)
    ours.send(("reload", {"batch_size": 7}))
    assert applied.wait(10)
    assert not gone.is_set()
    ours.close()  # the supervisor dies
    assert gone.wait(10)
    theirs.close()


class NoPollerFiles:
    def collect(self) -> list:
        return []


def test_a_standalone_coordinator_answers_reload_with_501() -> None:
    app = CoordinatorApp(StatusMonitor(settings(), FakeStore(), FakeDepth(), list), NoPollerFiles(), None)
    status, body = call(app, "/-/reload", "POST", POOL_CLIENT)
    assert status == "501 Not Implemented"
    assert "pool start" in body["error"] and "supervisorctl restart pool:*" in body["error"]
    assert call(app, "/-/reload")[0].startswith("405")


@pytest.fixture
def answering_501() -> Iterator[str]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the base class's naming
            body = b'{"error": "runs on its own"}'
            self.send_response(501)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_pool_reload_passes_on_the_coordinators_reason(answering_501: str) -> None:
    error = request_reload(answering_501)
    assert error == f"the coordinator at {answering_501} cannot reload: runs on its own"
    assert not re.search(r"is `pool start` running", error)
