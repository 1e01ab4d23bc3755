"""Settings: defaults < PULSE_* environment < overrides, and one clear ConfigError per bad value."""

from __future__ import annotations

import re

import pytest

from pool.config import ENVIRONMENT, RELAY_COLUMNS, Columns, Settings, load_settings
from pool.errors import ConfigError, PoolError


def raises_config_error(environ=None, overrides=None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_settings(environ=environ or {}, overrides=overrides)
    return info.value


def assert_one_line_naming(error: ConfigError, variable: str) -> None:
    message = str(error)
    assert variable in message
    assert "\n" not in message and "\r" not in message
    assert message.strip() == message and message


# --- defaults ------------------------------------------------------------------------


def test_defaults_without_any_environment() -> None:
    settings = load_settings(environ={})
    assert settings == Settings()
    assert settings.db_url == "sqlite:///pulse_signals.db"
    assert settings.task_name == "ingest_and_score_signal"
    assert settings.table == "signals"
    assert settings.metrics_port == 9200
    assert settings.metrics_host == "127.0.0.1"
    assert settings.queue == "celery"
    assert settings.batch_size == 500
    assert settings.workers == 1
    assert settings.log_level == "INFO"
    assert settings.log_format == "text"
    assert settings.columns == Columns()
    assert (settings.columns.id, settings.columns.name, settings.columns.value) == ("id", "name", "value")
    assert settings.columns.processed == "processed"


def test_defaults_of_retry_backpressure_and_shutdown_settings() -> None:
    settings = load_settings(environ={})
    assert (settings.poll_interval, settings.busy_poll_interval) == (1.0, 0.05)
    assert settings.retry_base_seconds == 1.0
    assert settings.retry_cap_seconds == 300.0
    assert settings.max_attempts == 5
    assert settings.max_payload_bytes == 65536
    assert settings.backpressure_high == 500_000
    assert settings.backpressure_low == 250_000
    assert settings.shutdown_timeout == 30.0


def test_load_settings_ignores_unrelated_environment() -> None:
    assert load_settings(environ={"HOME": "/root", "PULSE": "x", "PULSE_UNKNOWN": "y"}) == Settings()


def test_empty_environment_variable_counts_as_unset() -> None:
    environ = {name: "" for name in ENVIRONMENT.values()}
    assert load_settings(environ=environ) == Settings()


def test_every_setting_has_a_pulse_variable() -> None:
    assert all(name.startswith("PULSE_") for name in ENVIRONMENT.values())
    assert len(set(ENVIRONMENT.values())) == len(ENVIRONMENT)


# --- precedence ----------------------------------------------------------------------


def test_environment_overrides_defaults() -> None:
    settings = load_settings(
        environ={
            "PULSE_DB_URL": "postgresql://u:p@db:5432/pulse",
            "PULSE_DB_POLL_INTERVAL": "0.25",
            "PULSE_BROKER_URL": "redis://localhost:6379/0",
            "PULSE_BROKER_FOLDER": "/tmp/broker",
            "PULSE_TASK_NAME": "tasks.score",
            "PULSE_QUEUE": "signals.high",
            "PULSE_BATCH_SIZE": "50",
            "PULSE_LEASE_SECONDS": "30",
            "PULSE_WORKERS": "4",
            "PULSE_METRICS_PORT": "9300",
            "PULSE_METRICS_HOST": "0.0.0.0",
            "PULSE_DB_TABLE": "my_signals",
            "PULSE_LOG_LEVEL": "debug",
            "PULSE_LOG_FORMAT": "json",
            "PULSE_DB_COLUMN_ID": "signal_id",
            "PULSE_DB_COLUMN_NAME": "label",
            "PULSE_DB_COLUMN_VALUE": "reading",
            "PULSE_DB_COLUMN_SOURCE": "origin",
            "PULSE_DB_COLUMN_TIMESTAMP": "created_at",
            "PULSE_DB_COLUMN_PROCESSED": "done",
            "PULSE_RETRY_BASE_SECONDS": "0.5",
            "PULSE_RETRY_CAP_SECONDS": "60",
            "PULSE_MAX_ATTEMPTS": "8",
            "PULSE_MAX_PAYLOAD_BYTES": "1024",
            "PULSE_BACKPRESSURE_HIGH": "1000",
            "PULSE_BACKPRESSURE_LOW": "100",
            "PULSE_SHUTDOWN_TIMEOUT": "12.5",
        }
    )
    assert settings.db_url == "postgresql://u:p@db:5432/pulse"
    assert settings.poll_interval == 0.25
    assert settings.broker_url == "redis://localhost:6379/0"
    assert settings.broker_folder == "/tmp/broker"
    assert settings.task_name == "tasks.score"
    assert settings.queue == "signals.high"
    assert settings.batch_size == 50
    assert settings.lease_seconds == 30.0
    assert settings.workers == 4
    assert settings.metrics_port == 9300
    assert settings.metrics_host == "0.0.0.0"
    assert settings.table == "my_signals"
    assert settings.log_level == "DEBUG"
    assert settings.log_format == "json"
    assert settings.columns == Columns(
        id="signal_id",
        name="label",
        value="reading",
        source="origin",
        timestamp="created_at",
        processed="done",
    )
    assert settings.retry_base_seconds == 0.5
    assert settings.retry_cap_seconds == 60.0
    assert settings.max_attempts == 8
    assert settings.max_payload_bytes == 1024
    assert settings.backpressure_high == 1000
    assert settings.backpressure_low == 100
    assert settings.shutdown_timeout == 12.5


def test_overrides_beat_environment() -> None:
    environ = {"PULSE_WORKERS": "4", "PULSE_DB_TABLE": "from_env", "PULSE_BATCH_SIZE": "10"}
    settings = load_settings(environ=environ, overrides={"workers": "8", "table": "from_flag"})
    assert settings.workers == 8
    assert settings.table == "from_flag"
    assert settings.batch_size == 10  # not overridden: the environment still applies


def test_overrides_beat_defaults_without_environment() -> None:
    settings = load_settings(environ={}, overrides={"queue": "q1", "metrics_port": 0, "column_id": "pk"})
    assert settings.queue == "q1"
    assert settings.metrics_port == 0
    assert settings.columns.id == "pk"
    assert settings.columns.name == "name"


def test_cli_overrides_of_new_settings_beat_environment() -> None:
    environ = {"PULSE_SHUTDOWN_TIMEOUT": "10", "PULSE_MAX_ATTEMPTS": "3", "PULSE_LOG_FORMAT": "kv"}
    settings = load_settings(environ=environ, overrides={"shutdown_timeout": "2", "max_attempts": "9",
                                                         "log_format": "json"})
    assert settings.shutdown_timeout == 2.0
    assert settings.max_attempts == 9
    assert settings.log_format == "json"


def test_none_override_means_unset() -> None:
    settings = load_settings(environ={"PULSE_WORKERS": "3"}, overrides={"workers": None, "table": None})
    assert settings.workers == 3
    assert settings.table == "signals"


def test_bad_environment_is_reported_even_when_a_flag_overrides_it() -> None:
    # The environment is parsed first; an invalid variable is still an error worth knowing about.
    error = raises_config_error(environ={"PULSE_WORKERS": "many"}, overrides={"workers": "2"})
    assert_one_line_naming(error, "PULSE_WORKERS")


def test_unknown_override_key_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown setting"):
        load_settings(environ={}, overrides={"no_such_setting": "1"})


def test_values_are_stripped() -> None:
    settings = load_settings(
        environ={"PULSE_BATCH_SIZE": " 20 ", "PULSE_DB_TABLE": " tbl\n", "PULSE_LOG_LEVEL": " warning "}
    )
    assert settings.batch_size == 20
    assert settings.table == "tbl"
    assert settings.log_level == "WARNING"


def test_config_error_is_a_pool_error_with_exit_code_2() -> None:
    error = raises_config_error(environ={"PULSE_WORKERS": "x"})
    assert isinstance(error, PoolError)
    assert error.exit_code == 2


# --- valid edge values ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "raw", "attribute", "expected"),
    [
        ("PULSE_BATCH_SIZE", "1", "batch_size", 1),
        ("PULSE_BATCH_SIZE", "100000", "batch_size", 100_000),
        ("PULSE_WORKERS", "256", "workers", 256),
        ("PULSE_METRICS_PORT", "0", "metrics_port", 0),
        ("PULSE_METRICS_PORT", "65535", "metrics_port", 65535),
        ("PULSE_DB_POLL_INTERVAL", "0.001", "poll_interval", 0.001),
        ("PULSE_DB_POLL_INTERVAL", "3600", "poll_interval", 3600.0),
        ("PULSE_DB_BUSY_POLL_INTERVAL", "0.001", "busy_poll_interval", 0.001),
        ("PULSE_DB_BUSY_POLL_INTERVAL", "0.5", "busy_poll_interval", 0.5),
        ("PULSE_LEASE_SECONDS", "1", "lease_seconds", 1.0),
        ("PULSE_LEASE_SECONDS", "86400", "lease_seconds", 86400.0),
        ("PULSE_DB_URL", "sqlite:////var/lib/pulse.db", "db_url", "sqlite:////var/lib/pulse.db"),
        ("PULSE_DB_URL", "postgres://u@h/db", "db_url", "postgres://u@h/db"),
        ("PULSE_DB_URL", "postgresql+psycopg://u:p@h/db", "db_url", "postgresql+psycopg://u:p@h/db"),
        ("PULSE_DB_URL", "POSTGRESQL://h/db", "db_url", "POSTGRESQL://h/db"),
        (
            "PULSE_BROKER_URL",
            "amqp://guest:guest@localhost:5672//",
            "broker_url",
            "amqp://guest:guest@localhost:5672//",
        ),
        ("PULSE_BROKER_URL", "pyamqp://localhost//", "broker_url", "pyamqp://localhost//"),
        ("PULSE_BROKER_URL", "rediss://:pw@cache:6380/1", "broker_url", "rediss://:pw@cache:6380/1"),
        ("PULSE_BROKER_URL", "memory://", "broker_url", "memory://"),
        ("PULSE_QUEUE", "a.b:c-d_1", "queue", "a.b:c-d_1"),
        ("PULSE_QUEUE", "q" * 200, "queue", "q" * 200),
        ("PULSE_DB_TABLE", "_t", "table", "_t"),
        ("PULSE_DB_TABLE", "T" + "x" * 62, "table", "T" + "x" * 62),
        ("PULSE_LOG_LEVEL", "error", "log_level", "ERROR"),
        ("PULSE_LOG_FORMAT", "text", "log_format", "text"),
        ("PULSE_LOG_FORMAT", "kv", "log_format", "kv"),
        ("PULSE_LOG_FORMAT", "json", "log_format", "json"),
        ("PULSE_LOG_FORMAT", " JSON\n", "log_format", "json"),
        ("PULSE_LOG_FORMAT", "KV", "log_format", "kv"),
        ("PULSE_RETRY_BASE_SECONDS", "0.001", "retry_base_seconds", 0.001),
        ("PULSE_RETRY_BASE_SECONDS", "300", "retry_base_seconds", 300.0),
        ("PULSE_RETRY_CAP_SECONDS", "1", "retry_cap_seconds", 1.0),
        ("PULSE_RETRY_CAP_SECONDS", "86400", "retry_cap_seconds", 86400.0),
        ("PULSE_MAX_ATTEMPTS", "1", "max_attempts", 1),
        ("PULSE_MAX_ATTEMPTS", "1000", "max_attempts", 1000),
        ("PULSE_MAX_PAYLOAD_BYTES", "256", "max_payload_bytes", 256),
        ("PULSE_MAX_PAYLOAD_BYTES", str(512 * 1024 * 1024), "max_payload_bytes", 512 * 1024 * 1024),
        ("PULSE_BACKPRESSURE_HIGH", "0", "backpressure_high", 0),
        ("PULSE_BACKPRESSURE_HIGH", "1000000000", "backpressure_high", 1_000_000_000),
        ("PULSE_BACKPRESSURE_LOW", "0", "backpressure_low", 0),
        ("PULSE_BACKPRESSURE_LOW", "499999", "backpressure_low", 499_999),
        ("PULSE_SHUTDOWN_TIMEOUT", "0.1", "shutdown_timeout", 0.1),
        ("PULSE_SHUTDOWN_TIMEOUT", "3600", "shutdown_timeout", 3600.0),
    ],
)
def test_valid_edge_values_are_accepted(variable: str, raw: str, attribute: str, expected: object) -> None:
    assert getattr(load_settings(environ={variable: raw}), attribute) == expected


def test_identifier_of_63_characters_is_accepted_for_columns() -> None:
    name = "c" * 63
    assert load_settings(environ={"PULSE_DB_COLUMN_NAME": name}).columns.name == name


# --- invalid values ------------------------------------------------------------------

BAD_IDENTIFIERS = [
    "my signals",
    "signals; drop table x",
    'sig"nals',
    "sig'nals",
    "sig`nals",
    "1signals",
    "9",
    "signals-2",
    "public.signals",
    "sïgnals",
    "a" * 64,
    "a" * 200,
    "x\ny",
    "--",
]

INVALID = [
    # integers
    ("PULSE_BATCH_SIZE", "abc"),
    ("PULSE_BATCH_SIZE", "1.5"),
    ("PULSE_BATCH_SIZE", "10k"),
    ("PULSE_BATCH_SIZE", "0"),
    ("PULSE_BATCH_SIZE", "-1"),
    ("PULSE_BATCH_SIZE", "100001"),
    ("PULSE_BATCH_SIZE", "9" * 5000),
    ("PULSE_WORKERS", "0"),
    ("PULSE_WORKERS", "257"),
    ("PULSE_WORKERS", "two"),
    ("PULSE_METRICS_PORT", "-1"),
    ("PULSE_METRICS_PORT", "65536"),
    ("PULSE_METRICS_PORT", "http"),
    # numbers
    ("PULSE_DB_POLL_INTERVAL", "nan"),
    ("PULSE_DB_POLL_INTERVAL", "NaN"),
    ("PULSE_DB_POLL_INTERVAL", "inf"),
    ("PULSE_DB_POLL_INTERVAL", "-inf"),
    ("PULSE_DB_POLL_INTERVAL", "0"),
    ("PULSE_DB_POLL_INTERVAL", "-1"),
    ("PULSE_DB_POLL_INTERVAL", "3601"),
    ("PULSE_DB_BUSY_POLL_INTERVAL", "0"),
    ("PULSE_DB_BUSY_POLL_INTERVAL", "nan"),
    ("PULSE_DB_BUSY_POLL_INTERVAL", "soon"),
    ("PULSE_DB_POLL_INTERVAL", "1e-9"),
    ("PULSE_DB_POLL_INTERVAL", "fast"),
    ("PULSE_DB_POLL_INTERVAL", "1s"),
    ("PULSE_LEASE_SECONDS", "0.5"),
    ("PULSE_LEASE_SECONDS", "86401"),
    ("PULSE_LEASE_SECONDS", "nan"),
    ("PULSE_LEASE_SECONDS", "infinity"),
    ("PULSE_LEASE_SECONDS", "1m"),
    # retries
    ("PULSE_RETRY_BASE_SECONDS", "0"),
    ("PULSE_RETRY_BASE_SECONDS", "-1"),
    ("PULSE_RETRY_BASE_SECONDS", "nan"),
    ("PULSE_RETRY_BASE_SECONDS", "1s"),
    ("PULSE_RETRY_BASE_SECONDS", "86401"),
    ("PULSE_RETRY_CAP_SECONDS", "0"),
    ("PULSE_RETRY_CAP_SECONDS", "inf"),
    ("PULSE_RETRY_CAP_SECONDS", "86401"),
    ("PULSE_RETRY_CAP_SECONDS", "5m"),
    ("PULSE_MAX_ATTEMPTS", "0"),
    ("PULSE_MAX_ATTEMPTS", "-1"),
    ("PULSE_MAX_ATTEMPTS", "1001"),
    ("PULSE_MAX_ATTEMPTS", "2.5"),
    ("PULSE_MAX_ATTEMPTS", "five"),
    # payload size
    ("PULSE_MAX_PAYLOAD_BYTES", "255"),
    ("PULSE_MAX_PAYLOAD_BYTES", "0"),
    ("PULSE_MAX_PAYLOAD_BYTES", "64k"),
    ("PULSE_MAX_PAYLOAD_BYTES", str(512 * 1024 * 1024 + 1)),
    # backpressure
    ("PULSE_BACKPRESSURE_HIGH", "-1"),
    ("PULSE_BACKPRESSURE_HIGH", "1e6"),
    ("PULSE_BACKPRESSURE_HIGH", "1000000001"),
    ("PULSE_BACKPRESSURE_HIGH", "off"),
    ("PULSE_BACKPRESSURE_LOW", "-1"),
    ("PULSE_BACKPRESSURE_LOW", "half"),
    # shutdown
    ("PULSE_SHUTDOWN_TIMEOUT", "0"),
    ("PULSE_SHUTDOWN_TIMEOUT", "0.05"),
    ("PULSE_SHUTDOWN_TIMEOUT", "-5"),
    ("PULSE_SHUTDOWN_TIMEOUT", "nan"),
    ("PULSE_SHUTDOWN_TIMEOUT", "inf"),
    ("PULSE_SHUTDOWN_TIMEOUT", "3601"),
    ("PULSE_SHUTDOWN_TIMEOUT", "30s"),
    # URLs
    ("PULSE_DB_URL", "mysql://x"),
    ("PULSE_DB_URL", "mysql+pymysql://u:p@h/db"),
    ("PULSE_DB_URL", "redis://localhost"),
    ("PULSE_DB_URL", "pulse_signals.db"),
    ("PULSE_DB_URL", "localhost:5432/db"),
    ("PULSE_DB_URL", "sqlite:/x.db"),
    ("PULSE_DB_URL", "://host/db"),
    ("PULSE_BROKER_URL", "http://localhost"),
    ("PULSE_BROKER_URL", "localhost:6379"),
    ("PULSE_BROKER_URL", "sqs://"),
    # log level
    ("PULSE_LOG_LEVEL", "verbose"),
    ("PULSE_LOG_LEVEL", "CRITICAL"),
    ("PULSE_LOG_LEVEL", "10"),
    # log format
    ("PULSE_LOG_FORMAT", "logfmt"),
    ("PULSE_LOG_FORMAT", "yaml"),
    ("PULSE_LOG_FORMAT", "jsonl"),
    ("PULSE_LOG_FORMAT", "key=value"),
    ("PULSE_LOG_FORMAT", "js on"),
    ("PULSE_LOG_FORMAT", "json\ntext"),
    ("PULSE_LOG_FORMAT", "   "),
    # queue
    ("PULSE_QUEUE", "my queue"),
    ("PULSE_QUEUE", "q/1"),
    ("PULSE_QUEUE", "q;x"),
    ("PULSE_QUEUE", "q" * 201),
    ("PULSE_QUEUE", "   "),
    # task name
    ("PULSE_TASK_NAME", "my task"),
    ("PULSE_TASK_NAME", "   "),
    # free text settings must not be blank
    ("PULSE_METRICS_HOST", "   "),
    ("PULSE_BROKER_FOLDER", "   "),
    # SQL identifiers
    *[("PULSE_DB_TABLE", bad) for bad in BAD_IDENTIFIERS],
    *[("PULSE_DB_COLUMN_ID", bad) for bad in BAD_IDENTIFIERS],
    ("PULSE_DB_TABLE", "   "),
    ("PULSE_DB_COLUMN_NAME", "na me"),
    ("PULSE_DB_COLUMN_VALUE", "value;"),
    ("PULSE_DB_COLUMN_SOURCE", '"source"'),
    ("PULSE_DB_COLUMN_TIMESTAMP", "2ts"),
    ("PULSE_DB_COLUMN_PROCESSED", "p" * 64),
]


@pytest.mark.parametrize(("variable", "raw"), INVALID, ids=[f"{v}={r[:30]!r}" for v, r in INVALID])
def test_invalid_environment_value_raises_one_line_config_error(variable: str, raw: str) -> None:
    error = raises_config_error(environ={variable: raw})
    assert_one_line_naming(error, variable)
    assert error.__cause__ is None or isinstance(error.__cause__, ConfigError)
    assert error.__suppress_context__ or error.__context__ is None


@pytest.mark.parametrize(("variable", "raw"), INVALID, ids=[f"{v}={r[:30]!r}" for v, r in INVALID])
def test_invalid_override_names_the_same_variable(variable: str, raw: str) -> None:
    key = next(k for k, name in ENVIRONMENT.items() if name == variable)
    error = raises_config_error(environ={}, overrides={key: raw})
    assert_one_line_naming(error, variable)


@pytest.mark.parametrize("raw", ["", "   "])
def test_blank_override_is_rejected_not_ignored(raw: str) -> None:
    error = raises_config_error(overrides={"db_url": raw})
    assert_one_line_naming(error, "PULSE_DB_URL")


def test_bad_url_message_does_not_echo_password() -> None:
    for url in ("mysql://user:hunter2@db/x", "user:hunter2@db/x"):
        error = raises_config_error(environ={"PULSE_DB_URL": url})
        assert "hunter2" not in str(error)
    error = raises_config_error(environ={"PULSE_BROKER_URL": "http://user:hunter2@mq/"})
    assert "hunter2" not in str(error)


def test_url_without_scheme_says_so() -> None:
    error = raises_config_error(environ={"PULSE_DB_URL": "db.example.com/pulse"})
    assert "scheme" in str(error)


def test_unsupported_scheme_lists_supported_ones() -> None:
    message = str(raises_config_error(environ={"PULSE_DB_URL": "mysql://x"}))
    assert "mysql" in message
    assert "postgresql" in message and "sqlite" in message


@pytest.mark.parametrize(
    "environ",
    [
        {"PULSE_DB_COLUMN_NAME": "source"},
        {"PULSE_DB_COLUMN_VALUE": "id"},
        {"PULSE_DB_COLUMN_SOURCE": "x", "PULSE_DB_COLUMN_TIMESTAMP": "x"},
        {"PULSE_DB_COLUMN_PROCESSED": "timestamp"},
    ],
)
def test_duplicate_column_names_are_rejected(environ: dict[str, str]) -> None:
    error = raises_config_error(environ=environ)
    assert_one_line_naming(error, "PULSE_DB_COLUMN")


def test_duplicate_column_names_via_override_are_rejected() -> None:
    error = raises_config_error(
        environ={"PULSE_DB_COLUMN_NAME": "label"}, overrides={"column_value": "label"}
    )
    assert_one_line_naming(error, "PULSE_DB_COLUMN")


def test_swapping_column_names_is_allowed() -> None:
    settings = load_settings(environ={"PULSE_DB_COLUMN_NAME": "source", "PULSE_DB_COLUMN_SOURCE": "name"})
    assert (settings.columns.name, settings.columns.source) == ("source", "name")


@pytest.mark.parametrize(
    "environ",
    [
        {"PULSE_DB_COLUMN_SOURCE": "last_error"},
        {"PULSE_DB_COLUMN_NAME": "attempts"},
        {"PULSE_DB_COLUMN_TIMESTAMP": "dead_at"},
    ],
)
def test_column_name_equal_to_a_relay_column_is_rejected(environ: dict[str, str]) -> None:
    error = raises_config_error(environ=environ)
    assert_one_line_naming(error, "PULSE_DB_COLUMN")


def test_dead_at_is_a_relay_column() -> None:
    assert "dead_at" in RELAY_COLUMNS


@pytest.mark.parametrize("relay_column", RELAY_COLUMNS)
def test_no_seed_column_may_take_any_relay_column_name(relay_column: str) -> None:
    error = raises_config_error(overrides={"column_processed": relay_column})
    assert_one_line_naming(error, "PULSE_DB_COLUMN")
    assert relay_column in str(error)


# --- settings checked against each other ---------------------------------------------


@pytest.mark.parametrize(
    "environ",
    [
        {"PULSE_RETRY_BASE_SECONDS": "10", "PULSE_RETRY_CAP_SECONDS": "5"},
        {"PULSE_RETRY_BASE_SECONDS": "301"},  # above the default cap of 300
        {"PULSE_RETRY_CAP_SECONDS": "0.5"},  # below the default base of 1
    ],
)
def test_retry_cap_below_base_is_rejected(environ: dict[str, str]) -> None:
    error = raises_config_error(environ=environ)
    assert_one_line_naming(error, "PULSE_RETRY_CAP_SECONDS")
    assert "PULSE_RETRY_BASE_SECONDS" in str(error)


def test_retry_cap_equal_to_base_is_accepted() -> None:
    settings = load_settings(environ={"PULSE_RETRY_BASE_SECONDS": "7", "PULSE_RETRY_CAP_SECONDS": "7"})
    assert settings.retry_base_seconds == settings.retry_cap_seconds == 7.0


def test_retry_cap_below_base_via_flags_is_rejected() -> None:
    error = raises_config_error(overrides={"retry_base_seconds": "60", "retry_cap_seconds": "30"})
    assert_one_line_naming(error, "PULSE_RETRY_CAP_SECONDS")


@pytest.mark.parametrize(
    "environ",
    [
        {"PULSE_BACKPRESSURE_HIGH": "100", "PULSE_BACKPRESSURE_LOW": "100"},
        {"PULSE_BACKPRESSURE_HIGH": "100", "PULSE_BACKPRESSURE_LOW": "200"},
        {"PULSE_BACKPRESSURE_LOW": "500000"},  # equal to the default high
        {"PULSE_BACKPRESSURE_HIGH": "1", "PULSE_BACKPRESSURE_LOW": "1"},
    ],
)
def test_backpressure_low_not_below_high_is_rejected(environ: dict[str, str]) -> None:
    error = raises_config_error(environ=environ)
    assert_one_line_naming(error, "PULSE_BACKPRESSURE_LOW")
    assert "PULSE_BACKPRESSURE_HIGH" in str(error)


def test_backpressure_low_just_below_high_is_accepted() -> None:
    settings = load_settings(environ={"PULSE_BACKPRESSURE_HIGH": "100", "PULSE_BACKPRESSURE_LOW": "99"})
    assert (settings.backpressure_high, settings.backpressure_low) == (100, 99)


@pytest.mark.parametrize("low", ["0", "250000", "999999999"])
def test_backpressure_high_0_turns_it_off_whatever_low_is(low: str) -> None:
    settings = load_settings(environ={"PULSE_BACKPRESSURE_HIGH": "0", "PULSE_BACKPRESSURE_LOW": low})
    assert settings.backpressure_high == 0
    assert settings.backpressure_low == int(low)


# --- settings file (PULSE_CONFIG) ------------------------------------------------------


def test_a_settings_file_sits_between_defaults_and_the_environment(tmp_path) -> None:
    config = tmp_path / "pool.toml"
    config.write_text('batch_size = 1000\ndb_poll_interval = 0.5\ndb_table = "events"\nlog_level = "debug"\n')
    settings = load_settings(environ={"PULSE_CONFIG": str(config), "PULSE_BATCH_SIZE": "20"})
    assert settings.batch_size == 20  # the environment beats the file
    assert (settings.poll_interval, settings.table, settings.log_level) == (0.5, "events", "DEBUG")
    flagged = load_settings(environ={}, overrides={"config": str(config), "poll_interval": "2"})
    assert (flagged.batch_size, flagged.poll_interval) == (1000, 2.0)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("batch_size = 'many'", "PULSE_BATCH_SIZE must be an integer"),
        ("no_such_thing = 1", "unknown setting 'no_such_thing'"),
        ("batch_size = [1]", "must be a string or a number"),
        ("batch_size = true", "must be a string or a number"),
        ("batch_size = ", "is not valid TOML"),
    ],
)
def test_a_bad_settings_file_is_one_config_error(tmp_path, content: str, message: str) -> None:
    config = tmp_path / "pool.toml"
    config.write_text(content)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_settings(environ={"PULSE_CONFIG": str(config)})


def test_a_missing_settings_file_says_which(tmp_path) -> None:
    with pytest.raises(ConfigError, match="PULSE_CONFIG: cannot read .*nope.toml"):
        load_settings(environ={"PULSE_CONFIG": str(tmp_path / "nope.toml")})


@pytest.mark.parametrize(("raw", "seconds"), [("7d", 604800.0), ("90s", 90.0), ("0", 0.0), ("off", 0.0)])
def test_prune_age_reads_durations(raw: str, seconds: float) -> None:
    assert load_settings(environ={"PULSE_PRUNE_PROCESSED_AFTER": raw}).prune_processed_after == seconds


def test_a_bad_prune_age_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="PULSE_PRUNE_PROCESSED_AFTER: 'soon' is not an age"):
        load_settings(environ={"PULSE_PRUNE_PROCESSED_AFTER": "soon"})
