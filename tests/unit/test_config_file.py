"""Every way a settings file can be bad is one ConfigError line, never another exception."""

from __future__ import annotations

import os

import pytest

from pool.config import MAX_CONFIG_FILE_BYTES, load_settings
from pool.errors import ConfigError

BAD_FILES = {
    "not UTF-8": (b"batch_size = 10\n# caf\xe9\n", "is not UTF-8"),
    "UTF-16": ("batch_size = 10\n".encode("utf-16"), "is not UTF-8"),
    "not TOML": (b"batch_size = = 1\n", "is not valid TOML"),
    "an integer of 5000 digits": (b"batch_size = " + b"9" * 5000 + b"\n", "is not valid TOML"),
    "a huge integer": (b"batch_size = " + b"9" * 400 + b"\n", "PULSE_BATCH_SIZE must be between"),
    "a huge float": (b"db_poll_interval = 1e999\n", "PULSE_DB_POLL_INTERVAL must be between"),
    "nan": (b"db_poll_interval = nan\n", "PULSE_DB_POLL_INTERVAL must be between"),
    "arrays nested deep": (b"batch_size = " + b"[" * 100_000 + b"]" * 100_000 + b"\n", "is not valid TOML"),
    "a table": (b"[batch_size]\nx = 1\n", "must be a string or a number"),
    "a date": (b"batch_size = 1979-05-27\n", "must be a string or a number"),
    "a boolean": (b"batch_size = true\n", "must be a string or a number"),
    "an unknown key": (b"batch_sise = 10\n", "unknown setting 'batch_sise'"),
    "a huge file": (b"# " + b"x" * MAX_CONFIG_FILE_BYTES + b"\n", "is over"),
    "NUL bytes": (b"batch_size = 1\x00\n", "is not valid TOML"),
}


@pytest.mark.parametrize("content, expected", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_a_bad_settings_file_is_one_config_error(tmp_path, content, expected):
    path = tmp_path / "pool.toml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as raised:
        load_settings(environ={"PULSE_CONFIG": str(path)})
    message = str(raised.value)
    assert expected in message
    assert "\n" not in message and len(message) < 300


def test_a_directory_or_a_missing_file_is_one_config_error(tmp_path):
    for path, expected in ((tmp_path, "cannot read .*: Is a directory"),
                           (tmp_path / "missing.toml", "cannot read .*: No such file or directory")):
        with pytest.raises(ConfigError, match=expected):
            load_settings(environ={"PULSE_CONFIG": str(path)})


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_file_is_one_config_error(tmp_path):
    path = tmp_path / "pool.toml"
    path.write_text("batch_size = 10\n")
    path.chmod(0)
    with pytest.raises(ConfigError, match="cannot read .*: Permission denied"):
        load_settings(environ={"PULSE_CONFIG": str(path)})


def test_a_good_file_still_loads(tmp_path):
    path = tmp_path / "pool.toml"
    path.write_text('batch_size = 10\ndb_poll_interval = 0.5\ndb_column_name = "label"\n')
    settings = load_settings(environ={"PULSE_CONFIG": str(path)})
    assert (settings.batch_size, settings.poll_interval, settings.columns.name) == (10, 0.5, "label")
