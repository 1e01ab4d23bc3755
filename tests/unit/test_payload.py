"""build_payload: a claimed row becomes a JSON-safe task argument, or a PayloadError saying why not."""

from __future__ import annotations

import json
import math
import time
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal

import pytest

from pool.payload import DEFAULT_MAX_PAYLOAD_BYTES, PayloadError, build_payload, task_id_for
from pool.store import ClaimedRow, Unreadable

AWARE = datetime(2024, 5, 1, 12, 30, 45, 123456, tzinfo=UTC)


@pytest.fixture(autouse=True)
def far_from_utc(monkeypatch):
    """Every test here runs in a time zone far from UTC: a naive time read as local time would
    otherwise pass unnoticed on a machine set to UTC."""
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def row(
    id: int = 1,
    name: object = "temperature",
    value: object = 21.5,
    source: object = "sensor-1",
    timestamp: object = AWARE,
    attempts: int = 0,
) -> ClaimedRow:
    return ClaimedRow(id=id, name=name, value=value, source=source, timestamp=timestamp, attempts=attempts)


def strict_json(payload: dict) -> str:
    return json.dumps(payload, allow_nan=False)


def parsed_time(text: str) -> datetime:
    parsed = datetime.fromisoformat(text)
    assert parsed.tzinfo is not None, f"{text!r} carries no UTC offset"
    return parsed


# --- shape ---------------------------------------------------------------------------


def test_payload_has_exactly_the_signal_fields() -> None:
    payload = build_payload(row(id=7))
    assert payload == {
        "id": 7,
        "name": "temperature",
        "value": 21.5,
        "source": "sensor-1",
        "timestamp": "2024-05-01T12:30:45.123456+00:00",
    }


def test_payload_round_trips_through_strict_json() -> None:
    payload = build_payload(row(value=Decimal("3.25"), timestamp="2024-05-01 12:30:45"))
    assert json.loads(strict_json(payload)) == payload


def test_attempts_are_not_part_of_the_payload() -> None:
    assert "attempts" not in build_payload(row(attempts=3))


def test_task_id_is_deterministic_per_row() -> None:
    assert task_id_for(42) == "signal-42"
    assert task_id_for(42) == task_id_for(42)
    assert task_id_for(1) != task_id_for(11)


def test_payload_error_is_a_value_error() -> None:
    assert issubclass(PayloadError, ValueError)


# --- timestamps ----------------------------------------------------------------------


def test_aware_datetime_becomes_iso_8601_with_offset() -> None:
    text = build_payload(row(timestamp=AWARE))["timestamp"]
    assert text == "2024-05-01T12:30:45.123456+00:00"
    assert parsed_time(text) == AWARE


def test_aware_datetime_in_another_zone_keeps_the_same_instant() -> None:
    plus_two = datetime(2024, 5, 1, 14, 30, tzinfo=timezone(timedelta(hours=2)))
    text = build_payload(row(timestamp=plus_two))["timestamp"]
    assert parsed_time(text) == datetime(2024, 5, 1, 12, 30, tzinfo=UTC)


def test_naive_datetime_is_taken_as_utc() -> None:
    naive = datetime(2024, 5, 1, 12, 30, 45)
    text = build_payload(row(timestamp=naive))["timestamp"]
    assert text == "2024-05-01T12:30:45+00:00"
    assert parsed_time(text) == naive.replace(tzinfo=UTC)


@pytest.mark.parametrize(
    ("stored", "expected"),
    [
        # SQLite's CURRENT_TIMESTAMP default
        ("2024-05-01 12:30:45", datetime(2024, 5, 1, 12, 30, 45, tzinfo=UTC)),
        # strftime('%Y-%m-%d %H:%M:%f') as the relay writes times
        ("2024-05-01 12:30:45.123", datetime(2024, 5, 1, 12, 30, 45, 123000, tzinfo=UTC)),
        # datetime.isoformat() of a naive value, as `pool seed` stores them in SQLite
        ("2024-05-01T12:30:45.123456", datetime(2024, 5, 1, 12, 30, 45, 123456, tzinfo=UTC)),
        ("2024-05-01T12:30:45+00:00", datetime(2024, 5, 1, 12, 30, 45, tzinfo=UTC)),
        ("2024-05-01T14:30:45+02:00", datetime(2024, 5, 1, 12, 30, 45, tzinfo=UTC)),
        ("2024-05-01T12:30:45Z", datetime(2024, 5, 1, 12, 30, 45, tzinfo=UTC)),
    ],
)
def test_iso_strings_become_iso_8601_with_offset(stored: str, expected: datetime) -> None:
    text = build_payload(row(timestamp=stored))["timestamp"]
    assert parsed_time(text) == expected
    assert "T" in text


def test_iso_bytes_are_accepted() -> None:
    text = build_payload(row(timestamp=b"2024-05-01 12:30:45"))["timestamp"]
    assert parsed_time(text) == datetime(2024, 5, 1, 12, 30, 45, tzinfo=UTC)


def test_date_becomes_iso_date() -> None:
    assert build_payload(row(timestamp=date(2024, 5, 1)))["timestamp"] == "2024-05-01"


@pytest.mark.parametrize("epoch", [1_714_566_645, 1_714_566_645.5, 0])
def test_epoch_seconds_become_utc_iso_8601(epoch: float) -> None:
    text = build_payload(row(timestamp=epoch))["timestamp"]
    assert parsed_time(text) == datetime.fromtimestamp(epoch, tz=UTC)
    assert parsed_time(text).utcoffset() == timedelta(0)


def test_null_timestamp_passes_as_none() -> None:
    assert build_payload(row(timestamp=None))["timestamp"] is None


@pytest.mark.parametrize(
    "bad",
    ["yesterday", "", "2024-13-01 00:00:00", "2024-05-01 25:00", "1714566645", float("nan"), float("inf")],
)
def test_unreadable_timestamp_raises_payload_error(bad: object) -> None:
    with pytest.raises(PayloadError, match="timestamp"):
        build_payload(row(timestamp=bad))


def test_an_unreadable_timestamp_is_quoted_in_its_error_by_its_first_40_characters() -> None:
    # The error becomes the dead row's last_error: enough of the value to find it, never all of it.
    stored = "2024-05-01 but not a time " + "z" * 10_000
    with pytest.raises(PayloadError) as info:
        build_payload(row(timestamp=stored))
    assert str(info.value) == f"timestamp is not an ISO-8601 time ({stored[:40]!r})"


@pytest.mark.parametrize("epoch", [1_714_566_645_000, 1.7e12, 1e20, -1e20])
def test_out_of_range_numeric_timestamp_raises_payload_error(epoch: float) -> None:
    with pytest.raises(PayloadError, match="timestamp"):
        build_payload(row(timestamp=epoch))


# --- values --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stored", "expected"),
    [
        (Decimal("12.5"), 12.5),
        (Decimal("-0.001"), -0.001),
        (Decimal("1E+3"), 1000.0),
        (Decimal("0.1"), 0.1),
    ],
)
def test_decimal_values_become_floats(stored: Decimal, expected: float) -> None:
    value = build_payload(row(value=stored))["value"]
    assert type(value) is float
    assert value == expected


def test_int_and_float_values_pass_through() -> None:
    assert build_payload(row(value=3))["value"] == 3
    assert build_payload(row(value=-2.75))["value"] == -2.75


@pytest.mark.parametrize(("stored", "expected"), [("1.5", 1.5), (" 2 ", 2.0), ("-1e3", -1000.0)])
def test_numeric_strings_become_floats(stored: str, expected: float) -> None:
    # SQLite's dynamic typing can hand back a REAL column's value as text.
    assert build_payload(row(value=stored))["value"] == expected


@pytest.mark.parametrize(
    "bad",
    [
        float("nan"),
        float("inf"),
        float("-inf"),
        Decimal("NaN"),
        Decimal("Infinity"),
        Decimal("-Infinity"),
        Decimal("1E+400"),
        "nan",
        "NaN",
        "inf",
        "-inf",
        "Infinity",
        "-Infinity",
        "1e400",
    ],
    ids=repr,
)
def test_non_finite_values_raise_payload_error(bad: object) -> None:
    with pytest.raises(PayloadError, match="value"):
        build_payload(row(value=bad))


@pytest.mark.parametrize("bad", ["abc", "", "1,5", "12 kg", b"1.5", [1], {"a": 1}], ids=repr)
def test_non_numeric_values_raise_payload_error(bad: object) -> None:
    with pytest.raises(PayloadError, match="value"):
        build_payload(row(value=bad))


def test_payload_error_message_for_long_garbage_is_short() -> None:
    with pytest.raises(PayloadError) as info:
        build_payload(row(value="x" * 10_000))
    assert len(str(info.value)) < 200


# --- text fields and NULLs -----------------------------------------------------------


def test_null_source_and_timestamp_pass_as_json_null() -> None:
    payload = build_payload(row(source=None, timestamp=None))
    assert payload["source"] is None
    assert payload["timestamp"] is None
    assert payload["name"] == "temperature" and payload["value"] == 21.5
    decoded = json.loads(strict_json(payload))
    assert decoded["source"] is None and decoded["timestamp"] is None


def test_null_name_is_rejected() -> None:
    with pytest.raises(PayloadError) as info:
        build_payload(row(name=None))
    assert str(info.value) == "name is NULL"


def test_null_value_is_rejected() -> None:
    with pytest.raises(PayloadError) as info:
        build_payload(row(value=None))
    assert str(info.value) == "value is NULL"


def test_null_is_reported_as_null_not_as_a_bad_number() -> None:
    # The message ends up in last_error; an operator must see the row is missing data.
    with pytest.raises(PayloadError, match="NULL"):
        build_payload(row(name=None, value=None, source=None, timestamp=None))


@pytest.mark.parametrize(("field", "empty"), [("name", ""), ("value", 0), ("value", 0.0)])
def test_falsy_but_present_name_and_value_are_not_null(field: str, empty: object) -> None:
    payload = build_payload(row(**{field: empty}))
    assert payload[field] == empty
    assert payload[field] is not None


def test_unicode_text_is_kept() -> None:
    payload = build_payload(row(name="température °C", source="capteur-✓ 😀"))
    assert payload["name"] == "température °C"
    assert payload["source"] == "capteur-✓ 😀"
    assert json.loads(strict_json(payload)) == payload


def test_utf8_bytes_are_decoded() -> None:
    assert build_payload(row(name="température".encode()))["name"] == "température"


def test_invalid_utf8_bytes_raise_payload_error() -> None:
    with pytest.raises(PayloadError, match="name"):
        build_payload(row(name=b"\xff\xfe"))


@pytest.mark.parametrize("field", ["name", "source"])
@pytest.mark.parametrize("bad", ["\ud800", "abc\udfffdef", "\udc80"], ids=repr)
def test_lone_surrogates_raise_payload_error(field: str, bad: str) -> None:
    with pytest.raises(PayloadError, match=field):
        build_payload(row(**{field: bad}))


def test_lone_surrogate_timestamp_raises_payload_error() -> None:
    with pytest.raises(PayloadError, match="timestamp"):
        build_payload(row(timestamp="2024-05-01\ud800"))


def test_lone_surrogate_value_raises_payload_error() -> None:
    with pytest.raises(PayloadError, match="value"):
        build_payload(row(value="\ud800"))


# --- size ----------------------------------------------------------------------------


def test_default_limit_is_64_kib() -> None:
    assert DEFAULT_MAX_PAYLOAD_BYTES == 64 * 1024
    build_payload(row(name="n" * 60_000))
    with pytest.raises(PayloadError, match="bytes"):
        build_payload(row(name="n" * DEFAULT_MAX_PAYLOAD_BYTES))


def test_payload_over_max_bytes_raises_payload_error() -> None:
    with pytest.raises(PayloadError, match="100"):
        build_payload(row(name="x" * 500), max_bytes=100)


def test_payload_exactly_at_max_bytes_is_accepted() -> None:
    payload = build_payload(row(name="x" * 50))
    size = len(json.dumps(payload, ensure_ascii=False).encode("utf-8"))
    assert build_payload(row(name="x" * 50), max_bytes=size) == payload
    with pytest.raises(PayloadError):
        build_payload(row(name="x" * 50), max_bytes=size - 1)


def test_size_counts_utf8_bytes_not_characters() -> None:
    ascii_payload = build_payload(row(name="a" * 40))
    limit = len(json.dumps(ascii_payload, ensure_ascii=False).encode("utf-8"))
    # Same number of characters, but "é" takes two bytes in UTF-8.
    with pytest.raises(PayloadError):
        build_payload(row(name="é" * 40), max_bytes=limit)


# --- everything that passes is strict JSON -------------------------------------------


@pytest.mark.parametrize(
    "candidate",
    [
        row(),
        row(source=None, timestamp=None),
        row(name="", value=0),
        row(value=Decimal("1.1"), timestamp=datetime(2020, 1, 1)),
        row(value="2.5", timestamp="2020-01-01 00:00:00.5"),
        row(value=10**30, timestamp=0),
        row(name='quote " and \\ backslash', source="tab\tnewline\n"),
    ],
)
def test_accepted_payloads_serialise_with_allow_nan_false(candidate: ClaimedRow) -> None:
    payload = build_payload(candidate)
    text = strict_json(payload)
    assert json.loads(text) == payload
    for number in (payload["value"],):
        assert number is None or math.isfinite(number)


# --- values the driver could not read ------------------------------------------------------

INFINITY = Unreadable("infinity", "timestamp too large (after year 10K): 'infinity'")


@pytest.mark.parametrize("field", ["name", "value", "source", "timestamp"])
def test_an_unreadable_value_rejects_its_row_naming_the_field_and_the_reason(field: str) -> None:
    with pytest.raises(PayloadError) as caught:
        build_payload(row(**{field: INFINITY}))
    assert str(caught.value) == (
        f"{field} 'infinity' cannot be read (timestamp too large (after year 10K): 'infinity')")


def test_an_unreadable_value_is_never_sent_as_its_description() -> None:
    # Its str() describes the problem; _text would otherwise have relayed that as the name.
    with pytest.raises(PayloadError):
        build_payload(row(name=Unreadable("x", "why")))


# --- ids of a NUMERIC id column ---------------------------------------------------------------


@pytest.mark.parametrize("stored", [Decimal("12"), Decimal("-12"), Decimal("18446744073709551615"), 12.0])
def test_a_whole_numeric_id_is_sent_as_an_integer(stored: object) -> None:
    prepared = build_payload(row(id=stored))
    assert prepared["id"] == int(stored) and prepared["id"].__class__ is int


@pytest.mark.parametrize("stored", [Decimal("1.5"), Decimal("NaN"), Decimal("Infinity"), float("nan"), "7",
                                    None, True, date(2024, 5, 1), b"7"], ids=repr)
def test_an_id_that_is_no_integer_rejects_its_row(stored: object) -> None:
    # The PayloadError's message becomes the dead row's last_error: it names the id, where the
    # TypeError of int(None) or int(date) would tell the operator nothing about the row.
    with pytest.raises(PayloadError, match="^id .* is not an integer$"):
        build_payload(row(id=stored))
