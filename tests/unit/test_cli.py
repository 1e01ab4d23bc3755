"""The `pool` command: help, and bad configuration as one `pool: error:` line with exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from pool.cli import cli
from pool.errors import ConfigError

POOL = Path(sys.executable).parent / "pool"
COMMANDS = ("init-db", "seed", "start", "worker", "status", "scores")
CLOSED_PORT_URL = "postgresql://u:hunter2@127.0.0.1:1/db"


def clean_env(**pulse: str) -> dict[str, str]:
    """The current environment without any PULSE_* variable, plus the ones given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PULSE_")}
    env.update(pulse)
    return env


def runner_env(**pulse: str) -> dict[str, str | None]:
    """For CliRunner: unset every inherited PULSE_* variable, then set the given ones."""
    env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("PULSE_")}
    env.update(pulse)
    return env


def run_pool(cwd: Path, *args: str, **pulse: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(POOL), *args],
        cwd=cwd,
        env=clean_env(**pulse),
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


def assert_one_error_line(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("pool: error:"), lines[0]
    for needle in needles:
        assert needle in lines[0]
    return lines[0]


@pytest.fixture
def runner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.chdir(tmp_path)
    return CliRunner()


# --- help ----------------------------------------------------------------------------


def test_help_lists_every_command(runner: CliRunner) -> None:
    result = runner.invoke(cli, ["--help"], env=runner_env())
    assert result.exit_code == 0, result.output
    for command in COMMANDS:
        assert command in result.output


def test_short_help_flag(runner: CliRunner) -> None:
    result = runner.invoke(cli, ["-h"], env=runner_env())
    assert result.exit_code == 0
    assert "init-db" in result.output


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_has_help_naming_its_variables(runner: CliRunner, command: str) -> None:
    result = runner.invoke(cli, [command, "--help"], env=runner_env())
    assert result.exit_code == 0, result.output
    assert "--db-url" in result.output
    assert "PULSE_DB_URL" in result.output


@pytest.mark.parametrize("command", [*COMMANDS, "dead list", "dead requeue", "dead purge"])
def test_every_command_with_log_level_takes_log_format(runner: CliRunner, command: str) -> None:
    result = runner.invoke(cli, [*command.split(), "--help"], env=runner_env())
    assert result.exit_code == 0, result.output
    assert "--log-level" in result.output
    assert "--log-format" in result.output and "PULSE_LOG_FORMAT" in result.output


def test_start_help_shows_start_only_flags(runner: CliRunner) -> None:
    result = runner.invoke(cli, ["start", "--help"], env=runner_env())
    assert result.exit_code == 0
    for flag, variable in [
        ("--workers", "PULSE_WORKERS"),
        ("--batch-size", "PULSE_BATCH_SIZE"),
        ("--metrics-port", "PULSE_METRICS_PORT"),
        ("--shutdown-timeout", "PULSE_SHUTDOWN_TIMEOUT"),
        ("--max-attempts", "PULSE_MAX_ATTEMPTS"),
    ]:
        assert flag in result.output
        assert variable in result.output


def test_help_does_not_touch_the_database(runner: CliRunner, tmp_path: Path) -> None:
    for command in COMMANDS:
        runner.invoke(cli, [command, "--help"], env=runner_env())
    assert list(tmp_path.iterdir()) == []


# --- configuration errors through CliRunner ------------------------------------------


@pytest.mark.parametrize(
    ("args", "pulse", "variable"),
    [
        (["status"], {"PULSE_BATCH_SIZE": "abc"}, "PULSE_BATCH_SIZE"),
        (["status"], {"PULSE_DB_TABLE": "signals; drop table x"}, "PULSE_DB_TABLE"),
        (["status"], {"PULSE_DB_URL": "mysql://x"}, "PULSE_DB_URL"),
        (["status", "--db-url", "mysql://x"], {}, "PULSE_DB_URL"),
        (["start", "--workers", "0"], {}, "PULSE_WORKERS"),
        (["start", "--poll-interval", "nan"], {}, "PULSE_DB_POLL_INTERVAL"),
        (["init-db", "--table", "1table"], {}, "PULSE_DB_TABLE"),
        (["seed", "--log-level", "loud"], {}, "PULSE_LOG_LEVEL"),
        (["status", "--log-format", "xml"], {}, "PULSE_LOG_FORMAT"),
        (["start"], {"PULSE_LOG_FORMAT": "logfmt"}, "PULSE_LOG_FORMAT"),
        (["scores", "--queue", "bad queue"], {}, "PULSE_QUEUE"),
        (["worker"], {"PULSE_DB_COLUMN_NAME": "id"}, "PULSE_DB_COLUMN"),
        (["start", "--shutdown-timeout", "0"], {}, "PULSE_SHUTDOWN_TIMEOUT"),
        (["start", "--shutdown-timeout", "soon"], {}, "PULSE_SHUTDOWN_TIMEOUT"),
        (["start"], {"PULSE_SHUTDOWN_TIMEOUT": "-1"}, "PULSE_SHUTDOWN_TIMEOUT"),
        (["start", "--max-attempts", "0"], {}, "PULSE_MAX_ATTEMPTS"),
        (
            ["status"],
            {"PULSE_BACKPRESSURE_HIGH": "10", "PULSE_BACKPRESSURE_LOW": "20"},
            "PULSE_BACKPRESSURE_LOW",
        ),
        (
            ["start"],
            {"PULSE_RETRY_BASE_SECONDS": "60", "PULSE_RETRY_CAP_SECONDS": "1"},
            "PULSE_RETRY_CAP_SECONDS",
        ),
        (["status"], {"PULSE_DB_COLUMN_SOURCE": "dead_at"}, "PULSE_DB_COLUMN"),
    ],
)
def test_invalid_configuration_raises_config_error_before_any_work(
    runner: CliRunner, tmp_path: Path, args: list[str], pulse: dict[str, str], variable: str
) -> None:
    result = runner.invoke(cli, args, env=runner_env(**pulse))
    assert isinstance(result.exception, ConfigError), result.output
    assert variable in str(result.exception)
    assert "\n" not in str(result.exception)
    assert list(tmp_path.iterdir()) == []  # no database file was created


def test_flag_overrides_environment(runner: CliRunner) -> None:
    # A bad PULSE_WORKERS would fail; the flag value is the one checked for --workers.
    result = runner.invoke(cli, ["start", "--workers", "999"], env=runner_env(PULSE_WORKERS="2"))
    assert isinstance(result.exception, ConfigError)
    assert "PULSE_WORKERS" in str(result.exception) and "999" in str(result.exception)


def test_status_on_missing_table_says_run_init_db(runner: CliRunner, tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'empty.db'}"
    result = runner.invoke(cli, ["status", "--db-url", db_url], env=runner_env())
    assert isinstance(result.exception, ConfigError)
    assert "init-db" in str(result.exception)


def test_unknown_option_is_a_usage_error(runner: CliRunner) -> None:
    result = runner.invoke(cli, ["status", "--no-such-flag"], env=runner_env())
    assert result.exit_code == 2
    assert "No such option" in result.output


def test_unknown_command_is_a_usage_error(runner: CliRunner) -> None:
    result = runner.invoke(cli, ["frobnicate"], env=runner_env())
    assert result.exit_code == 2


# --- the real entry point: exit codes and stderr -------------------------------------


def test_pool_executable_exists() -> None:
    assert POOL.exists(), f"{POOL} not installed; run pip install -e . in the venv"


def test_subprocess_help_lists_every_command(tmp_path: Path) -> None:
    result = run_pool(tmp_path, "--help")
    assert result.returncode == 0, result.stderr
    for command in COMMANDS:
        assert command in result.stdout
    assert result.stderr == ""


def test_subprocess_version(tmp_path: Path) -> None:
    result = run_pool(tmp_path, "--version")
    assert result.returncode == 0
    assert "version" in result.stdout


@pytest.mark.parametrize(
    ("args", "pulse", "variable"),
    [
        (["status"], {"PULSE_BATCH_SIZE": "abc"}, "PULSE_BATCH_SIZE"),
        (["start"], {"PULSE_BATCH_SIZE": "abc"}, "PULSE_BATCH_SIZE"),
        (["status"], {"PULSE_DB_TABLE": "signals; drop table x"}, "PULSE_DB_TABLE"),
        (["init-db"], {"PULSE_DB_TABLE": "signals; drop table x"}, "PULSE_DB_TABLE"),
        (["start", "--workers", "0"], {}, "PULSE_WORKERS"),
        (["status"], {"PULSE_DB_URL": "mysql://x"}, "PULSE_DB_URL"),
        (["seed"], {"PULSE_DB_URL": "no-scheme"}, "PULSE_DB_URL"),
        (["start"], {"PULSE_DB_POLL_INTERVAL": "nan"}, "PULSE_DB_POLL_INTERVAL"),
        (["worker"], {"PULSE_BROKER_URL": "http://x"}, "PULSE_BROKER_URL"),
        (["scores"], {"PULSE_LOG_LEVEL": "chatty"}, "PULSE_LOG_LEVEL"),
        (["status"], {"PULSE_DB_COLUMN_VALUE": "name"}, "PULSE_DB_COLUMN"),
        (["status", "--db-url", "sqlite://"], {}, "PULSE_DB_URL"),
        (["start", "--shutdown-timeout", "0"], {}, "PULSE_SHUTDOWN_TIMEOUT"),
    ],
)
def test_invalid_configuration_exits_2_with_one_error_line(
    tmp_path: Path, args: list[str], pulse: dict[str, str], variable: str
) -> None:
    result = run_pool(tmp_path, *args, **pulse)
    assert_one_error_line(result, variable)
    assert result.stdout == ""
    assert not (tmp_path / "pulse_signals.db").exists()


def test_missing_table_exits_2_with_one_error_line(tmp_path: Path) -> None:
    result = run_pool(tmp_path, "status")
    assert_one_error_line(result, "init-db")


@pytest.mark.parametrize("command", COMMANDS)
def test_unreachable_postgres_exits_2_without_leaking_the_password(tmp_path: Path, command: str) -> None:
    result = run_pool(tmp_path, command, "--db-url", CLOSED_PORT_URL)
    line = assert_one_error_line(result)
    assert "hunter2" not in result.stdout
    assert "hunter2" not in result.stderr
    assert "127.0.0.1" in line  # still says which database


def test_unreachable_postgres_from_environment_does_not_leak_the_password(tmp_path: Path) -> None:
    result = run_pool(tmp_path, "status", PULSE_DB_URL=CLOSED_PORT_URL)
    assert_one_error_line(result)
    assert "hunter2" not in result.stdout + result.stderr


def test_broker_password_does_not_leak_on_database_error(tmp_path: Path) -> None:
    result = run_pool(
        tmp_path, "status", PULSE_DB_URL=CLOSED_PORT_URL, PULSE_BROKER_URL="redis://:brokerpw@127.0.0.1:1/0"
    )
    assert_one_error_line(result)
    assert "brokerpw" not in result.stdout + result.stderr


def test_unreachable_postgres_with_slash_in_password_does_not_leak_it(tmp_path: Path) -> None:
    result = run_pool(tmp_path, "status", "--db-url", "postgresql://u:hunter/2@127.0.0.1:1/db")
    assert_one_error_line(result)
    assert "hunter/2" not in result.stdout + result.stderr


def test_usage_error_exits_2_without_traceback(tmp_path: Path) -> None:
    result = run_pool(tmp_path, "status", "--no-such-flag")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "No such option" in result.stderr
