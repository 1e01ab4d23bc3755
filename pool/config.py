"""One Settings object: defaults < environment (PULSE_*) < command-line flags, validated."""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pool.durations import parse_age
from pool.errors import ConfigError
from pool.http_address import is_host
from pool.redact import redact_url

IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
QUEUE_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,200}$")
HOST_ID = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")
# A host name or an IP address (IPv6 with or without brackets) to bind to; nothing a resolver
# could not even be asked about (spaces, slashes, undecodable bytes).
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("text", "kv", "json")
CONFIG_FILE_VARIABLE = "PULSE_CONFIG"
# A settings file is a few dozen lines; anything this big is the wrong file.
MAX_CONFIG_FILE_BYTES = 1024 * 1024
# What a running `pool start` takes over on SIGHUP / `pool reload`; the rest needs a restart.
RELOADABLE = ("poll_interval", "busy_poll_interval", "batch_size", "backpressure_high", "backpressure_low",
              "log_level")
# Columns the relay adds beside the seed-shaped ones; names are fixed so that tools and
# dashboards agree on them whatever the user's own column names are.
RELAY_COLUMNS = (
    "lease_owner", "lease_until", "lease_token", "attempts", "next_attempt_at", "last_error", "dead_at",
)


@dataclass(frozen=True)
class Columns:
    """Names of the seed-shaped columns of the signals table."""

    id: str = "id"
    name: str = "name"
    value: str = "value"
    source: str = "source"
    timestamp: str = "timestamp"
    processed: str = "processed"


@dataclass(frozen=True)
class Settings:
    db_url: str = "sqlite:///pulse_signals.db"
    poll_interval: float = 1.0
    busy_poll_interval: float = 0.05
    broker_url: str = "filesystem://"
    broker_folder: str = "pool_broker"
    task_name: str = "ingest_and_score_signal"
    queue: str = "celery"
    batch_size: int = 500
    lease_seconds: float = 60.0
    workers: int = 1
    metrics_port: int = 9200
    metrics_host: str = "127.0.0.1"
    table: str = "signals"
    columns: Columns = field(default_factory=Columns)
    log_level: str = "INFO"
    log_format: str = "text"
    status_interval: float = 5.0
    shards: int = 64  # rows belong to shard id % shards; fixed per table by `pool init-db`
    shard_lease_seconds: float = 15.0
    host_id: str = ""  # empty: this machine's hostname
    prune_processed_after: float = 0.0  # seconds; 0 = the coordinator never prunes
    retry_base_seconds: float = 1.0
    retry_cap_seconds: float = 300.0
    max_attempts: int = 5
    max_payload_bytes: int = 64 * 1024
    backpressure_high: int = 500_000
    backpressure_low: int = 250_000
    shutdown_timeout: float = 30.0
    http_timeout: float = 10.0  # seconds a client has to send its request to the coordinator
    http_allowed_hosts: tuple[str, ...] = ()  # Host names the coordinator answers beyond its own
    http_token: str = field(default="", repr=False)  # required by POST /-/reload when set

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


# setting name -> (environment variable, parser). Column names live under "column_<name>".
ENVIRONMENT: dict[str, str] = {
    "db_url": "PULSE_DB_URL",
    "poll_interval": "PULSE_DB_POLL_INTERVAL",
    "busy_poll_interval": "PULSE_DB_BUSY_POLL_INTERVAL",
    "broker_url": "PULSE_BROKER_URL",
    "broker_folder": "PULSE_BROKER_FOLDER",
    "task_name": "PULSE_TASK_NAME",
    "queue": "PULSE_QUEUE",
    "batch_size": "PULSE_BATCH_SIZE",
    "lease_seconds": "PULSE_LEASE_SECONDS",
    "workers": "PULSE_WORKERS",
    "metrics_port": "PULSE_METRICS_PORT",
    "metrics_host": "PULSE_METRICS_HOST",
    "table": "PULSE_DB_TABLE",
    "log_level": "PULSE_LOG_LEVEL",
    "log_format": "PULSE_LOG_FORMAT",
    "status_interval": "PULSE_STATUS_INTERVAL",
    "shards": "PULSE_SHARDS",
    "shard_lease_seconds": "PULSE_SHARD_LEASE_SECONDS",
    "host_id": "PULSE_HOST_ID",
    "prune_processed_after": "PULSE_PRUNE_PROCESSED_AFTER",
    "retry_base_seconds": "PULSE_RETRY_BASE_SECONDS",
    "retry_cap_seconds": "PULSE_RETRY_CAP_SECONDS",
    "max_attempts": "PULSE_MAX_ATTEMPTS",
    "max_payload_bytes": "PULSE_MAX_PAYLOAD_BYTES",
    "backpressure_high": "PULSE_BACKPRESSURE_HIGH",
    "backpressure_low": "PULSE_BACKPRESSURE_LOW",
    "shutdown_timeout": "PULSE_SHUTDOWN_TIMEOUT",
    "http_timeout": "PULSE_HTTP_TIMEOUT",
    "http_allowed_hosts": "PULSE_HTTP_ALLOWED_HOSTS",
    "http_token": "PULSE_HTTP_TOKEN",
    **{f"column_{c.name}": f"PULSE_DB_COLUMN_{c.name.upper()}" for c in dataclasses.fields(Columns)},
}


def _shown(raw: Any) -> str:
    """A bad value as an error line quotes it: repr, cut short (a value may be megabytes long)."""
    text = repr(raw if isinstance(raw, str) else str(raw))
    return text if len(text) <= 42 else text[:40] + "…"


def _parse_int(env_name: str, raw: Any, minimum: int, maximum: int) -> int:
    try:
        value = int(str(raw).strip())
    except ValueError:
        raise ConfigError(f"{env_name} must be an integer, got {_shown(raw)}") from None
    if not minimum <= value <= maximum:
        raise ConfigError(f"{env_name} must be between {minimum} and {maximum}, got {_shown(value)}")
    return value


def _parse_float(env_name: str, raw: Any, minimum: float, maximum: float) -> float:
    try:
        value = float(str(raw).strip())
    except ValueError:
        raise ConfigError(f"{env_name} must be a number, got {_shown(raw)}") from None
    if not minimum <= value <= maximum:  # also rejects NaN
        raise ConfigError(f"{env_name} must be between {minimum} and {maximum}, got {_shown(raw)}")
    return value


def _parse_age(env_name: str, raw: Any) -> float:
    text = str(raw).strip()
    if text in ("", "0", "off"):
        return 0.0
    try:
        return parse_age(text)
    except ValueError as exc:
        raise ConfigError(f"{env_name}: {exc} (or 0 / off)") from None


def _parse_identifier(env_name: str, raw: Any) -> str:
    value = str(raw).strip()
    if not IDENTIFIER.match(value):
        raise ConfigError(
            f"{env_name} must be a plain SQL identifier (letters, digits, _; not starting "
            f"with a digit; at most 63 characters), got {_shown(value)}"
        )
    return value


def _parse_url(env_name: str, raw: Any, schemes: tuple[str, ...]) -> str:
    value = str(raw).strip()
    scheme, sep, _ = value.partition("://")
    if not sep or not scheme:
        raise ConfigError(f"{env_name} is not a URL (expected scheme://...)")
    base_scheme = scheme.split("+", 1)[0].lower()
    if base_scheme not in schemes:
        raise ConfigError(
            f"{env_name} has unsupported scheme {_shown(redact_url(scheme))};"
            f" expected one of {', '.join(schemes)}"
        )
    problem = _url_problem(value, database=env_name == ENVIRONMENT["db_url"])
    if problem:
        raise ConfigError(f"{env_name} {redact_url(value)} cannot be parsed: {problem}")
    return value


def _url_problem(url: str, database: bool) -> str | None:
    """Why the library that will read `url` (SQLAlchemy, or kombu for a broker) cannot, in words
    of our own: their messages quote pieces of the URL, which may be pieces of a password."""
    hint = "the port must be a number from 0 to 65535 (percent-encode / : @ ? # in a password)"
    if "[" in url.partition("?")[0] and "]" not in url:
        return "an IPv6 address needs its closing ]"
    try:
        if database:
            from sqlalchemy.engine import make_url

            parsed = make_url(url)
            if "@" in (parsed.host or ""):
                return "percent-encode an @ in the user name or password as %40"
            port = parsed.port
        else:
            from kombu.utils.url import parse_url

            port = parse_url(url).get("port")
    except ValueError as exc:
        return "an IPv6 address needs its closing ]" if "IPv6" in str(exc) else hint
    except Exception:  # noqa: BLE001 - SQLAlchemy's ArgumentError and whatever else a parser raises
        return "it is not a URL the driver can read"
    if port is not None and not 0 <= port <= 65535:
        return hint
    return None


DB_SCHEMES = ("sqlite", "postgresql", "postgres")
BROKER_SCHEMES = ("redis", "rediss", "amqp", "amqps", "pyamqp", "filesystem", "memory")


# Numeric settings: (type, smallest, largest).
NUMBER_RANGES: dict[str, tuple[type, float, float]] = {
    "poll_interval": (float, 0.001, 3600.0),
    "busy_poll_interval": (float, 0.001, 3600.0),
    "lease_seconds": (float, 1.0, 86400.0),
    "retry_base_seconds": (float, 0.001, 86400.0),
    "retry_cap_seconds": (float, 0.001, 86400.0),
    "shutdown_timeout": (float, 0.1, 3600.0),
    "status_interval": (float, 0.1, 3600.0),
    "http_timeout": (float, 0.1, 3600.0),
    "shard_lease_seconds": (float, 1.0, 3600.0),
    "max_attempts": (int, 1, 1000),
    "max_payload_bytes": (int, 256, 512 * 1024 * 1024),
    "backpressure_high": (int, 0, 1_000_000_000),
    "backpressure_low": (int, 0, 1_000_000_000),
    "batch_size": (int, 1, 100_000),
    "workers": (int, 1, 256),
    "metrics_port": (int, 0, 65535),
    "shards": (int, 1, 4096),
}


def _parse_choice(env_name: str, raw: Any, choices: tuple[str, ...], fold: Any) -> str:
    value = fold(str(raw).strip())
    if value not in choices:
        raise ConfigError(f"{env_name} must be one of {', '.join(choices)}, got {_shown(raw)}")
    return value


def _parse_pattern(env_name: str, raw: Any, pattern: re.Pattern, described: str) -> str:
    value = str(raw).strip()
    if not pattern.match(value):
        raise ConfigError(f"{env_name} must be {described}, got {_shown(value)}")
    return value


def _parse_bind_host(env_name: str, raw: Any) -> str:
    value = str(raw).strip()
    bare = value[1:-1] if value.startswith("[") and value.endswith("]") else value  # [::1] as in a URL
    if not is_host(bare):
        raise ConfigError(f"{env_name} must be an IP address (127.0.0.1, ::1, 0.0.0.0, ::) or a host name, "
                          f"got {value[:60]!r}")
    return bare


def _parse_host_list(env_name: str, raw: Any) -> tuple[str, ...]:
    hosts = tuple(h.strip().lower() for h in str(raw).split(",") if h.strip())
    bad = [h for h in hosts if h != "*" and not is_host(h)]
    if bad:
        raise ConfigError(f"{env_name} must list host names separated by commas (or *), got {bad[0][:60]!r}")
    return hosts


def _parse_token(env_name: str, raw: Any) -> str:
    value = str(raw).strip()
    # Never echo the value: it is a secret, and a wrong one is still close to the right one.
    if not 16 <= len(value) <= 256 or not all("!" <= c <= "~" for c in value):
        raise ConfigError(f"{env_name} must be 16 to 256 visible ASCII characters without spaces")
    return value


def _parse(key: str, raw: Any) -> Any:
    env_name = ENVIRONMENT[key]
    if key in NUMBER_RANGES:
        kind, smallest, largest = NUMBER_RANGES[key]
        if kind is int:
            return _parse_int(env_name, raw, int(smallest), int(largest))
        return _parse_float(env_name, raw, smallest, largest)
    if key == "db_url":
        return _parse_url(env_name, raw, DB_SCHEMES)
    if key == "broker_url":
        return _parse_url(env_name, raw, BROKER_SCHEMES)
    if key == "table" or key.startswith("column_"):
        return _parse_identifier(env_name, raw)
    if key == "queue":
        return _parse_pattern(env_name, raw, QUEUE_NAME, "1-200 characters of A-Z a-z 0-9 _ . : -")
    if key == "host_id":
        return _parse_pattern(env_name, raw, HOST_ID, "1-100 characters of A-Z a-z 0-9 _ . -")
    if key == "metrics_host":
        return _parse_bind_host(env_name, raw)
    if key == "http_allowed_hosts":
        return _parse_host_list(env_name, raw)
    if key == "http_token":
        return _parse_token(env_name, raw)
    if key == "task_name":
        value = str(raw).strip()
        if not value or any(ch.isspace() for ch in value):
            raise ConfigError(f"{env_name} must be a non-empty task name without spaces")
        return value
    if key == "log_level":
        return _parse_choice(env_name, raw, LOG_LEVELS, str.upper)
    if key == "log_format":
        return _parse_choice(env_name, raw, LOG_FORMATS, str.lower)
    if key == "prune_processed_after":
        return _parse_age(env_name, raw)
    value = str(raw).strip()
    if not value:
        raise ConfigError(f"{env_name} must not be empty")
    return value


def _file_values(path: str) -> dict[str, Any]:
    """Settings from a TOML file whose keys are the variables' names without PULSE_, in lower
    case (`batch_size = 1000`, `db_poll_interval = 0.5`, `db_column_name = "label"`).

    Every way the file can be bad is a one-line ConfigError: a reload must never take the
    supervisor down, and a start must not end in a traceback."""
    shown = path if path.isprintable() else repr(path)
    where = f"{CONFIG_FILE_VARIABLE}: {shown}"
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_CONFIG_FILE_BYTES + 1)
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the path
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise ConfigError(f"{CONFIG_FILE_VARIABLE}: cannot read {shown}: {reason}") from None
    if len(raw) > MAX_CONFIG_FILE_BYTES:
        raise ConfigError(f"{where} is over {MAX_CONFIG_FILE_BYTES // 1024} KiB; is it the right file?")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{where} is not UTF-8 text (byte {exc.start})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where} is not valid TOML: {exc}") from None
    # tomllib lets int() and recursion errors through: a number of thousands of digits, or
    # arrays nested thousands deep.
    except (ValueError, RecursionError) as exc:
        raise ConfigError(f"{where} is not valid TOML: {type(exc).__name__}: {str(exc)[:80]}") from None
    by_name = {env_name.removeprefix("PULSE_").lower(): key for key, env_name in ENVIRONMENT.items()}
    values = {}
    for name, value in data.items():
        key = by_name.get(name)
        if key is None:
            raise ConfigError(f"{where} has an unknown setting {name[:60]!r}")
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise ConfigError(f"{where}: {name} must be a string or a number")
        values[key] = _parse(key, value)
    return values


def load_settings(
    environ: Mapping[str, str] | None = None, overrides: Mapping[str, Any] | None = None
) -> Settings:
    """Build Settings from defaults, then the file named by PULSE_CONFIG (or the `config`
    override), then `environ`, then `overrides` (CLI flags; None = unset).

    Raises ConfigError with a one-line message naming the offending variable.
    """
    environ = os.environ if environ is None else environ
    overrides = dict(overrides or {})
    config_file = overrides.pop("config", None) or environ.get(CONFIG_FILE_VARIABLE) or None
    values: dict[str, Any] = _file_values(config_file) if config_file else {}
    for key, env_name in ENVIRONMENT.items():
        if env_name in environ and environ[env_name] != "":
            values[key] = _parse(key, environ[env_name])
    for key, raw in overrides.items():
        if raw is None:
            continue
        if key not in ENVIRONMENT:
            raise ValueError(f"unknown setting {key!r}")
        values[key] = _parse(key, raw)

    if "backpressure_high" in values and "backpressure_low" not in values:
        values["backpressure_low"] = values["backpressure_high"] // 2
    column_values = {
        key.removeprefix("column_"): values.pop(key) for key in list(values) if key.startswith("column_")
    }
    columns = Columns(**column_values)
    names = list(dataclasses.asdict(columns).values())
    if len(set(names)) != len(names):
        raise ConfigError("PULSE_DB_COLUMN_* names must all differ")
    taken = sorted(set(names) & set(RELAY_COLUMNS))
    if taken:
        raise ConfigError(
            f"PULSE_DB_COLUMN_* may not name the relay's own column(s) {', '.join(taken)}"
        )
    settings = Settings(columns=columns, **values)
    if settings.retry_cap_seconds < settings.retry_base_seconds:
        raise ConfigError("PULSE_RETRY_CAP_SECONDS must not be below PULSE_RETRY_BASE_SECONDS")
    if settings.backpressure_high and settings.backpressure_low >= settings.backpressure_high:
        raise ConfigError("PULSE_BACKPRESSURE_LOW must be below PULSE_BACKPRESSURE_HIGH (0 turns it off)")
    return settings
