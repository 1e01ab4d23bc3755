"""pool start's supervisor restarting its children: a crash loop backs off, a child that was working
or was killed comes back at once, even before it was first ready; a configuration error
stops it (exit 2); a child stuck past the shutdown timeout is killed (exit 3) (pool/supervisor.py).

The real Supervisor runs in a process of its own with tiny scripted children
(tests/supervised_children.py); what is checked is what an operator reads: its log lines and its
exit code."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from pathlib import Path

from tests.helpers import PoolProcess, clean_env

ROOT = Path(__file__).resolve().parents[2]
# "poller-0 (pid 123) exited with code 1 after 0.3 s; restarting in 0.5 s"
EXITED = re.compile(r"poller-0 \(pid \d+\) exited with code (-?\d+) after ([0-9.]+) s; "
                    r"restarting in ([0-9.]+) s")


def supervise(tmp_path: Path, steps: list[str], *options: str) -> PoolProcess:
    """The supervisor with a poller that does `steps` at its successive starts."""
    script = tmp_path / "poller-script.json"
    script.write_text(json.dumps(steps), encoding="utf-8")
    env = clean_env(PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return PoolProcess(str(script), *options, env=env, cwd=tmp_path,
                       program=[sys.executable, "-m", "tests.supervised_children"])


def restarts(process: PoolProcess, count: int) -> list[tuple[int, float]]:
    """(exit code, restart delay) of the poller's first `count` exits, as the supervisor logs them."""
    return [(int(match[1]), float(match[3])) for match in process.wait_for_lines(EXITED.pattern, count)]


def test_a_crash_loop_backs_off_up_to_the_cap_and_a_working_or_killed_child_comes_back_at_once(tmp_path):
    steps = [
        "ready, then fail",  # its first exit: nothing to back off from yet
        "fail", "fail", "fail",  # failing by itself before it is ready: 0.5, 1, 2 capped at 1.2
        "ready, then fail",  # it had worked: back at once, and the delay starts over from 0.5
        "killed",  # something else killed it: back at once, not in 0.5 s
        "serve",
    ]
    process = supervise(tmp_path, steps, "--restart-delay-cap", "1.2")
    try:
        assert restarts(process, 6) == [
            (1, 0.0),
            (1, 0.5), (1, 1.0), (1, 1.2),
            (1, 0.0),
            (-signal.SIGKILL, 0.0),
        ]
        process.wait_for_line(r"poller-0 \(pid \d+\) ready again")
        process.signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, process.output()
    finally:
        process.kill()
    assert "Traceback" not in process.output()


def test_a_child_failing_or_killed_before_it_is_first_ready_is_restarted_and_the_pool_becomes_ready(tmp_path):
    process = supervise(tmp_path, ["fail", "killed", "fail", "serve"])
    try:
        # Killed from outside: back at once; failing by itself: the doubling delay.
        assert restarts(process, 3) == [(1, 0.0), (-signal.SIGKILL, 0.0), (1, 0.5)]
        process.wait_for_line(r"ready: 1 pollers")
        process.signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, process.output()
    finally:
        process.kill()
    output = process.output()
    assert "exited before it was ready" not in output
    assert output.index("restarting in 0.5 s") < output.index("ready: 1 pollers")


def test_a_configuration_error_reported_by_a_child_stops_pool_start_with_exit_2(tmp_path):
    process = supervise(tmp_path, ["config error"])
    try:
        assert process.wait(timeout=30) == 2, process.output()
    finally:
        process.kill()
    output = process.output()
    assert "poller-0: PULSE_EXAMPLE is not a valid setting" in output
    assert "restarting" not in output and "ready:" not in output


def test_a_child_still_running_at_the_shutdown_deadline_is_killed_and_pool_start_exits_3(tmp_path):
    process = supervise(tmp_path, ["hang"], "--shutdown-timeout", "0.5")
    try:
        process.wait_for_line(r"ready: 1 pollers")
        process.signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 3, process.output()
    finally:
        process.kill()
    output = process.output()
    assert "poller-0 did not stop within the shutdown timeout; killing it" in output
    assert "coordinator did not stop" not in output  # it stopped in time: only the late one is killed
