"""Bad input to any command, by flag, environment or settings file: exit 2, one line on stderr,
no traceback and no password. (Table grown from running every command with bad values for each
of its options and every PULSE_* setting.)"""

from __future__ import annotations

import pytest

from tests.helpers import clean_env, run_pool

SECRET = "s3cret-pw-77"
LONG = "9" * 5000

# (arguments, environment, what the line must say)
BAD_INPUTS = {
    "id beyond 64 bits": (["dead", "requeue", "--id", "99999999999999999999999"], {}, "--id"),
    "negative id beyond 64 bits": (["dead", "requeue", "--id", "-99999999999999999999999"], {}, "--id"),
    "non-numeric limit": (["dead", "list", "--limit", "abc"], {}, "--limit"),
    "NaN timeout": (["scores", "--timeout", "nan"], {}, "--timeout"),
    "infinite timeout": (["scores", "--timeout", "inf"], {}, "--timeout"),
    "NaN purge age": (["dead", "purge", "--older-than", "nans", "--yes"], {}, "--older-than"),
    "prune age beyond any date": (["prune", "--processed-older-than", "300000000w"], {}, "too long an age"),
    "prune batch of 5000 digits": (["prune", "--processed-older-than", "1d", "--batch-size", LONG], {},
                                   "--batch-size must be a whole number"),
    "slot of 5000 digits": (["poller", "--slot", LONG], {"PROMETHEUS_MULTIPROC_DIR": "metrics"},
                            "--slot must be a whole number"),
    "unknown command": (["frobnicate"], {}, "No such command"),
    "automatic prune age beyond any date": (["start"], {"PULSE_PRUNE_PROCESSED_AFTER": "300000000w"},
                                            "PULSE_PRUNE_PROCESSED_AFTER"),
    "database port not a number": (["status"], {"PULSE_DB_URL": f"postgresql://u:{SECRET}@127.0.0.1:abc/x"},
                                   "the port must be a number"),
    "database IPv6 host unterminated": (["status"], {"PULSE_DB_URL": f"postgresql://u:{SECRET}@[::1/x"},
                                        "closing ]"),
    "database password with an unencoded @": (
        ["status"], {"PULSE_DB_URL": f"postgresql://u:p@{SECRET}@127.0.0.1:1/x"}, "percent-encode"),
    "database password in the query": (
        ["status"], {"PULSE_DB_URL": f"postgresql://u@127.0.0.1:1/x?password={SECRET}"}, "database"),
    "broker port not a number": (["start"], {"PULSE_BROKER_URL": f"redis://:{SECRET}@127.0.0.1:notaport/5"},
                                 "the port must be a number"),
    "broker port out of range": (["start"], {"PULSE_BROKER_URL": "redis://127.0.0.1:99999/5"},
                                 "the port must be a number"),
    "uncreatable broker folder": (["start"], {"PULSE_BROKER_FOLDER": "/proc/no-such/folder"},
                                  "PULSE_BROKER_FOLDER: cannot use"),
    "batch size of 23 digits": (["start"], {"PULSE_BATCH_SIZE": "99999999999999999999999"},
                                "PULSE_BATCH_SIZE must be between"),
    "poll interval of 5000 digits": (["start"], {"PULSE_DB_POLL_INTERVAL": LONG},
                                     "PULSE_DB_POLL_INTERVAL must be between"),
    "a queue name that is not UTF-8": (["start"], {"PULSE_QUEUE": "q\udcff"}, "PULSE_QUEUE must be"),
    "a metrics host that is not UTF-8": (["start"], {"PULSE_METRICS_HOST": "h\udcff"},
                                         "PULSE_METRICS_HOST must be an IP address"),
    "settings file that is not UTF-8": (["start"], {"PULSE_CONFIG": "latin1.toml"}, "is not UTF-8"),
    "settings file that is a directory": (["start"], {"PULSE_CONFIG": "."}, "cannot read"),
}


@pytest.mark.parametrize("args, environment, expected", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_is_one_line_exit_2_without_traceback_or_password(args, environment, expected, tmp_path):
    (tmp_path / "latin1.toml").write_bytes(b"queue = \"caf\xe9\"\n")
    env = clean_env()
    assert run_pool("init-db", env=env, cwd=tmp_path).returncode == 0
    result = run_pool(*args, env={**env, **environment}, cwd=tmp_path, timeout=60)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("pool: error:"), result.stderr
    assert expected in lines[0] and len(lines[0]) < 400, lines[0]
    assert "Traceback" not in result.stderr and SECRET not in result.stderr + result.stdout
