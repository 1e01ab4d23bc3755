"""Logging set-up shared by every pool process, in one of three formats (PULSE_LOG_FORMAT).

- `text` (the default): the human format pool always had, fields appended as ` key=value`.
- `kv`: logfmt, one event per line:
  `ts=2026-11-28T23:40:01.123Z level=info process=poller-3 logger=pool.poller msg="batch done" claimed=500`
- `json`: one JSON object per line with the keys ts, level, process, logger, msg and the fields.

In kv and json an event is always exactly one line: newlines inside a message are escaped, and
an exception becomes two more keys, `exc` (its summary, `ValueError: boom`) and `traceback` (the
whole formatted traceback). Timestamps are UTC ISO-8601 with milliseconds; text keeps the local
time it always had. A kv value is quoted only when it holds whitespace, `=`, `"`, `\\` or a
control character, and its escapes are JSON's, so a quoted value decodes with json.loads.

Structured fields - the one convention: pass a dict as `extra={"fields": {...}}`::

    log.info("backpressure released: ...", extra={"fields": {"event": "backpressure_released",
                                                              "queue": "celery", "depth": 120}})

Keep the message a complete sentence (people and tests grep it); the fields carry what a machine
filters or sums on. Values should be str, int, float, bool or None; anything else is logged as
its str(). Field names are made of letters, digits, `_`, `.` and `-` (other characters become
`_`); a field named like a fixed key (ts, level, process, logger, msg, exc, traceback, stack)
is written with a trailing `_` so it cannot overwrite it.

Passwords: every message, field value and traceback goes through pool.redact, both by pattern
(any `scheme://user:password@` in the text) and with the configured URLs passed to
setup_logging, which also hides a password that appears on its own.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from typing import Any

from pool.config import LOG_FORMATS as FORMATS
from pool.redact import redact_text, redact_url

FORMAT = "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"
FIXED_KEYS = frozenset({"ts", "level", "process", "logger", "msg", "exc", "traceback", "stack"})

_NOT_KEY_CHARS = re.compile(r"[^A-Za-z0-9_.-]")
# A logfmt value needs quotes when a reader could split it or take it for something else.
_NEEDS_QUOTES = re.compile(r'[\s="\\\x00-\x1f\x7f\x85\u2028\u2029]')
_ESCAPES = {ord("\\"): "\\\\", ord('"'): '\\"', ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"}
# Other control characters, and the Unicode line breaks that str.splitlines() honours.
_ESCAPES.update({c: f"\\u{c:04x}" for c in [*range(0x20), 0x7F, 0x85, 0x2028, 0x2029] if c not in _ESCAPES})


def setup_logging(
    level: str, process_name: str | None = None, log_format: str = "text", secret_urls: Sequence[str] = ()
) -> None:
    """Send every record to stderr in `log_format`, with passwords of `secret_urls` hidden."""
    if process_name:
        import multiprocessing

        multiprocessing.current_process().name = process_name
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(make_formatter(log_format, secret_urls))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Library chatter at INFO (connections, celery banners) would drown the relay's own lines.
    for noisy in ("celery", "kombu", "amqp", "sqlalchemy"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))


def make_formatter(log_format: str, secret_urls: Sequence[str] = ()) -> logging.Formatter:
    formatters = {"text": TextFormatter, "kv": KeyValueFormatter, "json": JsonFormatter}
    if log_format not in formatters:
        raise ValueError(f"unknown log format {log_format!r}; expected one of {', '.join(FORMATS)}")
    return formatters[log_format](secret_urls)


def utc_timestamp(created: float) -> str:
    """Seconds since the epoch -> `2026-11-28T23:40:01.123Z`, whatever the local time zone."""
    # Rounded in whole milliseconds: truncating the float turns .123 into .122 now and then.
    seconds, millis = divmod(round(created * 1000), 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


def kv_value(value: Any) -> str:
    """One logfmt value: bare when it is unambiguous, else quoted with \\ " and controls escaped."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):  # int's own repr: an IntEnum's would be `<Color.RED: 1>`
        return int.__repr__(value)
    if isinstance(value, float):
        return float.__repr__(value)
    text = str(value)
    if text and not _NEEDS_QUOTES.search(text):
        return text
    return '"' + text.translate(_ESCAPES) + '"'


class PoolFormatter(logging.Formatter):
    """What every format shares: redaction, the fields of a record, its exception."""

    def __init__(self, secret_urls: Sequence[str] = ()) -> None:
        super().__init__(FORMAT)
        self.secret_urls = tuple(url for url in secret_urls if url)

    def redact(self, text: str) -> str:
        return redact_text(redact_url(text), *self.secret_urls)

    def fields(self, record: logging.LogRecord) -> dict[str, Any]:
        raw = getattr(record, "fields", None)
        if raw is None:
            return {}
        if not isinstance(raw, Mapping):
            raw = {"fields": raw}
        fields: dict[str, Any] = {}
        for key, value in raw.items():
            name = _NOT_KEY_CHARS.sub("_", str(key)) or "_"
            if name in FIXED_KEYS:
                name += "_"
            if value is not None and not isinstance(value, bool | int | float):
                value = self.redact(str(value))
            fields[name] = value
        return fields

    def event(self, record: logging.LogRecord) -> dict[str, Any]:
        """The record as ordered keys, each value redacted; kv and json only encode it."""
        event: dict[str, Any] = {
            "ts": utc_timestamp(record.created),
            "level": record.levelname.lower(),
            "process": record.processName,
            "logger": record.name,
            "msg": self.redact(record.getMessage()),
        }
        event.update(self.fields(record))
        if record.exc_info and record.exc_info[0] is not None:
            exc_type, exc_value = record.exc_info[0], record.exc_info[1]
            summary = "".join(traceback.format_exception_only(exc_type, exc_value)).strip()
            event["exc"] = self.redact(summary)
            event["traceback"] = self.redact(self.formatException(record.exc_info))
        if record.stack_info:
            event["stack"] = self.redact(self.formatStack(record.stack_info))
        return event


class TextFormatter(PoolFormatter):
    """The human format: `<local time> INFO poller-0 pool.poller: message key=value`, tracebacks
    on the lines below as before."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        fields = self.fields(record)
        if fields:
            line += "".join(f" {key}={kv_value(value)}" for key, value in fields.items())
        return line

    def format(self, record: logging.LogRecord) -> str:
        return self.redact(super().format(record))


class KeyValueFormatter(PoolFormatter):
    def format(self, record: logging.LogRecord) -> str:
        return " ".join(f"{key}={kv_value(value)}" for key, value in self.event(record).items())


class JsonFormatter(PoolFormatter):
    def format(self, record: logging.LogRecord) -> str:
        event = {key: _json_safe(value) for key, value in self.event(record).items()}
        # ensure_ascii also escapes U+2028/U+2029, which some line readers split on.
        return json.dumps(event, ensure_ascii=True, separators=(",", ":"))


def _json_safe(value: Any) -> Any:
    # NaN and infinities are not JSON; as strings they still say what happened.
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    return value
