"""Log formats: text as before, kv (logfmt) and json one line per event, fields, UTC, no passwords."""

from __future__ import annotations

import io
import json
import logging
import multiprocessing
import os
import re
import time
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any

import pytest

from pool.config import LOG_FORMATS
from pool.logs import FORMATS, kv_value, make_formatter, setup_logging, utc_timestamp
from tests.helpers import parse_kv

TS = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"

def emit(log_format: str, message: str = "batch done", *args: Any, level: int = logging.INFO,
         fields: Any = None, exc: BaseException | None = None, secret_urls: Sequence[str] = ()) -> str:
    """What one log call writes in `log_format`, through a logger of its own."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(make_formatter(log_format, secret_urls))
    logger = logging.getLogger(f"pool.test.{uuid.uuid4().hex[:8]}")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    extra = None if fields is None else {"fields": fields}
    exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    logger.log(level, message, *args, extra=extra, exc_info=exc_info)
    logger.removeHandler(handler)
    return stream.getvalue()


def raised(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as caught:  # noqa: B036 (any exception is fine here)
        return caught


# --- kv (logfmt) ---------------------------------------------------------------------


def test_kv_line_has_the_fixed_keys_then_the_fields() -> None:
    out = emit("kv", fields={"claimed": 500, "seconds": 0.012, "queue": "celery"})
    assert out.endswith("\n") and out.count("\n") == 1
    line = out.rstrip("\n")
    assert re.fullmatch(
        rf"ts={TS} level=info process=\S+ logger=pool\.test\.\w+ msg=\"batch done\" "
        r"claimed=500 seconds=0\.012 queue=celery",
        line,
    ), line
    assert list(parse_kv(line)) == ["ts", "level", "process", "logger", "msg", "claimed", "seconds", "queue"]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("celery", "celery"),
        ("naïve", "naïve"),
        ("a.b:c-d/e", "a.b:c-d/e"),
        ("", '""'),
        ("two words", '"two words"'),
        ("a=b", '"a=b"'),
        ('say "hi"', r'"say \"hi\""'),
        ("back\\slash", r'"back\\slash"'),
        ("line\nbreak", r'"line\nbreak"'),
        ("cr\r", r'"cr\r"'),
        ("tab\there", r'"tab\there"'),
        ("\x1b[31mred", r'"\u001b[31mred"'),
        ("nul\x00", r'"nul\u0000"'),
        ("sep\u2028x", r'"sep\u2028x"'),
        (None, "null"),
        (True, "true"),
        (False, "false"),
        (0, "0"),
        (-3, "-3"),
        (0.25, "0.25"),
        (float("nan"), "nan"),
        (HTTPStatus.OK, "200"),
    ],
)
def test_kv_values_are_quoted_only_when_needed_and_escaped(value: Any, expected: str) -> None:
    assert kv_value(value) == expected


@pytest.mark.parametrize(
    "text", ['quote " and \\ backslash', "multi\nline\r\nmessage", "tab\tand = sign", "", "\x07bell ✓"]
)
def test_kv_escaping_round_trips(text: str) -> None:
    out = emit("kv", "%s", text, fields={"value": text})
    assert out.count("\n") == 1
    parsed = parse_kv(out.rstrip("\n"))
    assert parsed["msg"] == text
    assert parsed["value"] == text


def test_kv_level_names_are_lower_case() -> None:
    for level, name in [(logging.DEBUG, "debug"), (logging.WARNING, "warning"), (logging.ERROR, "error")]:
        assert parse_kv(emit("kv", level=level).rstrip("\n"))["level"] == name


# --- json ----------------------------------------------------------------------------


def test_json_line_is_one_object_with_fixed_keys_and_typed_fields() -> None:
    out = emit("json", "row %d is dead", 7, level=logging.WARNING,
               fields={"event": "row_dead", "row_id": 7, "ratio": 0.5, "ok": False, "none": None})
    assert out.count("\n") == 1
    event = json.loads(out)
    assert list(event)[:5] == ["ts", "level", "process", "logger", "msg"]
    assert re.fullmatch(TS, event["ts"])
    assert event["level"] == "warning"
    assert event["logger"].startswith("pool.test.")
    assert event["process"] == multiprocessing.current_process().name
    assert event["msg"] == "row 7 is dead"
    assert {k: event[k] for k in ("event", "row_id", "ratio", "ok", "none")} == {
        "event": "row_dead", "row_id": 7, "ratio": 0.5, "ok": False, "none": None,
    }


def test_json_is_valid_for_awkward_values() -> None:
    class Odd:
        def __str__(self) -> str:
            return "odd\nobject"

    out = emit("json", 'quote " backslash \\ newline \n tab \t sep \u2028 end',
               fields={"obj": Odd(), "nan": float("nan"), "inf": float("-inf"), "text": "✓"})
    assert out.count("\n") == 1
    assert out.isascii()  # no raw U+2028 or other character a line reader might split on
    event = json.loads(out)
    assert event["msg"] == 'quote " backslash \\ newline \n tab \t sep \u2028 end'
    assert (event["obj"], event["nan"], event["inf"], event["text"]) == ("odd\nobject", "nan", "-inf", "✓")


# --- exceptions: one event, one line -------------------------------------------------


@pytest.mark.parametrize("log_format", ["kv", "json"])
def test_an_exception_stays_on_the_line_of_its_event(log_format: str) -> None:
    exc = raised(ValueError("boom\nsecond line"))
    out = emit(log_format, "batch failed", level=logging.ERROR, fields={"claimed": 3}, exc=exc)
    assert out.count("\n") == 1, out
    event = json.loads(out) if log_format == "json" else parse_kv(out.rstrip("\n"))
    assert event["msg"] == "batch failed"
    assert event["exc"] == "ValueError: boom\nsecond line"
    assert event["traceback"].startswith("Traceback (most recent call last):")
    assert "raise exc" in event["traceback"]
    assert event["traceback"].rstrip().endswith("second line")


@pytest.mark.parametrize("log_format", ["kv", "json"])
def test_a_chained_exception_is_still_one_line(log_format: str) -> None:
    try:
        try:
            raise KeyError("inner")
        except KeyError as inner:
            raise RuntimeError("outer") from inner
    except RuntimeError as outer:
        out = emit(log_format, "failed", level=logging.ERROR, exc=outer)
    assert out.count("\n") == 1
    event = json.loads(out) if log_format == "json" else parse_kv(out.rstrip("\n"))
    assert event["exc"] == "RuntimeError: outer"
    assert "KeyError: 'inner'" in event["traceback"]


def test_stack_info_is_a_key_not_extra_lines() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(make_formatter("json"))
    logger = logging.getLogger(f"pool.test.{uuid.uuid4().hex[:8]}")
    logger.propagate = False
    logger.addHandler(handler)
    logger.warning("where am I", stack_info=True)
    assert stream.getvalue().count("\n") == 1
    assert json.loads(stream.getvalue())["stack"].startswith("Stack (most recent call last):")


def test_text_keeps_the_traceback_below_the_line_as_before() -> None:
    out = emit("text", "batch failed", level=logging.ERROR, exc=raised(ValueError("boom")))
    first, *rest = out.rstrip("\n").split("\n")
    assert re.fullmatch(r"\S+ \S+ ERROR \S+ pool\.test\.\w+: batch failed", first), first
    assert rest[0] == "Traceback (most recent call last):"
    assert rest[-1] == "ValueError: boom"


# --- text ----------------------------------------------------------------------------


def test_text_is_the_human_format_with_fields_appended() -> None:
    out = emit("text", "backpressure released", fields={"queue": "celery", "depth": 12, "note": "a b"})
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO \S+ pool\.test\.\w+: backpressure released"
        r' queue=celery depth=12 note="a b"\n',
        out,
    ), out


def test_text_without_fields_is_unchanged() -> None:
    formatter = make_formatter("text")
    record = logging.LogRecord("pool.poller", logging.INFO, __file__, 1, "stopped", None, None)
    assert formatter.format(record) == logging.Formatter(
        "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"
    ).format(record)


# --- fields convention ---------------------------------------------------------------


@pytest.mark.parametrize("log_format", ["kv", "json"])
def test_a_field_cannot_overwrite_a_fixed_key(log_format: str) -> None:
    out = emit(log_format, "real message", fields={"msg": "fake", "level": "x", "bad key=": 1})
    event = json.loads(out) if log_format == "json" else parse_kv(out.rstrip("\n"))
    assert event["msg"] == "real message"
    assert event["level"] == "info"
    assert event["msg_"] == "fake" and event["level_"] == "x"
    assert "bad_key_" in event


def test_fields_that_are_not_a_mapping_are_kept_under_fields() -> None:
    assert json.loads(emit("json", fields=[1, 2]))["fields"] == "[1, 2]"


def test_a_record_without_fields_has_only_the_fixed_keys() -> None:
    assert list(json.loads(emit("json"))) == ["ts", "level", "process", "logger", "msg"]


# --- timestamps ----------------------------------------------------------------------


@pytest.fixture
def far_time_zone(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Local time 5:45 ahead of UTC, so a local timestamp could not pass for UTC."""
    monkeypatch.setenv("TZ", "Asia/Kathmandu")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.parametrize(
    ("moment", "expected"),
    [
        (datetime(2026, 11, 28, 23, 40, 1, 123000, tzinfo=UTC), "2026-11-28T23:40:01.123Z"),
        (datetime(2026, 12, 31, 23, 59, 59, 999000, tzinfo=UTC), "2026-12-31T23:59:59.999Z"),
        (datetime(2027, 1, 1, 0, 0, 0, 0, tzinfo=UTC), "2027-01-01T00:00:00.000Z"),
        (datetime(2026, 1, 1, 0, 0, 0, 1000, tzinfo=UTC), "2026-01-01T00:00:00.001Z"),
    ],
)
def test_timestamps_are_utc_iso_8601_with_milliseconds(far_time_zone: None, moment: datetime,
                                                       expected: str) -> None:
    assert utc_timestamp(moment.timestamp()) == expected


@pytest.mark.parametrize("log_format", ["kv", "json"])
def test_a_record_is_stamped_in_utc(far_time_zone: None, log_format: str) -> None:
    before = datetime.now(UTC)
    out = emit(log_format)
    event = json.loads(out) if log_format == "json" else parse_kv(out.rstrip("\n"))
    stamped = datetime.strptime(event["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert abs((stamped - before).total_seconds()) < 5


# --- passwords -----------------------------------------------------------------------

DB_URL = "postgresql://pulse:s3cret@db.internal:5432/pulse"
BROKER_URL = "redis://:hunter2@cache:6379/0"


@pytest.mark.parametrize("log_format", FORMATS)
def test_a_password_in_a_url_inside_a_message_is_redacted(log_format: str) -> None:
    out = emit(log_format, "cannot reach %s", DB_URL)
    assert "s3cret" not in out
    assert "postgresql://pulse:***@db.internal:5432/pulse" in out


@pytest.mark.parametrize("log_format", FORMATS)
def test_a_url_nobody_configured_is_redacted_too(log_format: str) -> None:
    out = emit(log_format, "fell back to amqp://guest:topsecret@rabbit:5672//")
    assert "topsecret" not in out and "amqp://guest:***@rabbit:5672//" in out


@pytest.mark.parametrize("log_format", FORMATS)
def test_a_bare_configured_password_is_redacted_everywhere(log_format: str) -> None:
    exc = raised(ConnectionError("AUTH hunter2 failed"))
    out = emit(log_format, "broker said: AUTH hunter2 failed", level=logging.ERROR,
               fields={"error": "AUTH hunter2 failed", "url": BROKER_URL}, exc=exc,
               secret_urls=(DB_URL, BROKER_URL))
    assert "hunter2" not in out
    assert "AUTH *** failed" in out
    assert "redis://:***@cache:6379/0" in out


def test_a_password_with_a_quote_is_redacted_before_kv_escapes_it() -> None:
    url = 'redis://:pa"ss@cache:6379/0'
    out = emit("kv", "bare pa\"ss here", fields={"error": 'x pa"ss y'}, secret_urls=(url,))
    assert 'pa"ss' not in out and 'pa\\"ss' not in out  # neither raw nor as kv escapes it
    assert "bare *** here" in out


# --- set-up --------------------------------------------------------------------------


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    noisy = {name: logging.getLogger(name).level for name in ("celery", "kombu", "amqp", "sqlalchemy")}
    process = multiprocessing.current_process().name
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, noisy_level in noisy.items():
        logging.getLogger(name).setLevel(noisy_level)
    multiprocessing.current_process().name = process


def test_formats_are_the_settings_choices() -> None:
    assert FORMATS == LOG_FORMATS == ("text", "kv", "json")


def test_an_unknown_format_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown log format"):
        make_formatter("xml")


def test_setup_logging_in_json_names_the_process_and_filters_by_level(
    restore_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    setup_logging("INFO", "poller-3", "json", secret_urls=(DB_URL,))
    log = logging.getLogger("pool.poller")
    log.debug("not shown")
    log.info("batch done", extra={"fields": {"claimed": 500}})
    log.warning("database %s refused", DB_URL)
    lines = capsys.readouterr().err.splitlines()
    events = [json.loads(line) for line in lines]
    assert [e["msg"] for e in events] == [
        "batch done", "database postgresql://pulse:***@db.internal:5432/pulse refused",
    ]
    assert {e["process"] for e in events} == {"poller-3"}
    assert {e["logger"] for e in events} == {"pool.poller"}
    assert events[0]["claimed"] == 500


def test_setup_logging_defaults_to_text(restore_logging: None, capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("INFO", "pool")
    logging.getLogger("pool.supervisor").info("started poller-0 (pid %d)", os.getpid())
    line = capsys.readouterr().err
    assert re.fullmatch(r"\S+ \S+ INFO pool pool\.supervisor: started poller-0 \(pid \d+\)\n", line), line
