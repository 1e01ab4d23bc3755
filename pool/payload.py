"""Turn a claimed row into the task's JSON-safe argument, or say exactly why it cannot be."""

from __future__ import annotations

import json
import math
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any, NamedTuple

from pool.store import ClaimedRow, Unreadable

DEFAULT_MAX_PAYLOAD_BYTES = 64 * 1024
# Built once: json.dumps with any non-default option builds a new encoder on every call.
_ASCII_JSON = json.JSONEncoder(allow_nan=False)
_UTF8_JSON = json.JSONEncoder(allow_nan=False, ensure_ascii=False)


class PayloadError(ValueError):
    """This row cannot become a message; the other rows of its batch are not affected."""


def task_id_for(row_id: int) -> str:
    # Deterministic: a re-publish after a crash carries the same id, so consumers can dedupe.
    return f"signal-{row_id}"


def _number(field: str, value: Any) -> int | float | None:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float | Decimal):
        try:
            number = float(value)
        except ValueError:  # Decimal('sNaN')
            raise PayloadError(f"{field} is not a finite number ({value})") from None
        if not math.isfinite(number):
            raise PayloadError(f"{field} is not a finite number ({value})")
        return number
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            raise PayloadError(f"{field} is not a number ({value[:40]!r})") from None
        if not math.isfinite(number):
            raise PayloadError(f"{field} is not a finite number ({value[:40]!r})")
        return number
    if isinstance(value, Unreadable):
        raise PayloadError(f"{field} {value}")
    raise PayloadError(f"{field} has unsupported type {type(value).__name__}")


def _integer_id(value: Any) -> int:
    """An id from a NUMERIC (or other non-integer) id column, as the integer it holds."""
    if isinstance(value, Decimal | float) and not isinstance(value, bool):
        try:
            if value == int(value):
                return int(value)
        except (ValueError, OverflowError):  # NaN, infinity
            pass
    raise PayloadError(f"id {value!r} is not an integer")


def _text(field: str, value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise PayloadError(f"{field} is not valid UTF-8") from None
    if not isinstance(value, str):
        if isinstance(value, Unreadable):  # its str() is a description, not the value
            raise PayloadError(f"{field} {value}")
        value = str(value)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise PayloadError(f"{field} holds characters that are not valid Unicode") from None
    return value


def _timestamp(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        if value.tzinfo is None:
            # Naive times in the table are taken as UTC, as the database clock writes them.
            value = value.replace(tzinfo=UTC)
        return value.isoformat()
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            return datetime.fromtimestamp(value, tz=UTC).isoformat()
        except (ValueError, OverflowError, OSError):
            raise PayloadError(f"timestamp {value} is not a valid epoch time in seconds") from None
    text = _text("timestamp", value)
    assert text is not None
    try:
        return _timestamp(datetime.fromisoformat(text))
    except ValueError:
        raise PayloadError(f"timestamp is not an ISO-8601 time ({text[:40]!r})") from None


class Prepared(NamedTuple):
    """A row ready to publish: its task argument, and that argument as the JSON that is sent."""

    id: int
    payload: dict[str, Any]
    json: str


def prepare(row: ClaimedRow, max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> Prepared:
    """The task argument for `row`: {"id", "name", "value", "source", "timestamp"}, and its JSON.

    name and value are required; source and timestamp may be NULL (sent as null). The JSON is
    what Celery's serializer writes (ASCII, escaped), so publishers reuse it instead of
    encoding the row a second time."""
    if row.name is None:
        raise PayloadError("name is NULL")
    if row.value is None:
        raise PayloadError("value is NULL")
    row_id = row.id if row.id.__class__ is int else _integer_id(row.id)
    payload = {
        "id": row_id,
        "name": _text("name", row.name),
        "value": _number("value", row.value),
        "source": _text("source", row.source),
        "timestamp": _timestamp(row.timestamp),
    }
    text = _ASCII_JSON.encode(payload)
    # The limit is on UTF-8 bytes. Escaped ASCII is never shorter than UTF-8, so only a
    # payload over the limit in its escaped form needs its exact size.
    if len(text) > max_bytes:
        size = len(_UTF8_JSON.encode(payload).encode("utf-8"))
        if size > max_bytes:
            raise PayloadError(f"payload is {size} bytes, over the {max_bytes}-byte maximum")
    return Prepared(row_id, payload, text)


def build_payload(row: ClaimedRow, max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> dict[str, Any]:
    """The task argument for `row` (see `prepare`)."""
    return prepare(row, max_bytes).payload
