"""For any row, the message pool's batch paths put on the broker is the one Celery's send_task
would (property tests): on Redis the hand-built LPUSH text, on RabbitMQ the captured publishes.
A worker-visible difference (a header, argsrepr, the body's bytes, content type or encoding) is
a bug; so is a payload whose decoded arguments are not the row's values."""

from __future__ import annotations

import json
import time
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest
import redis
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pool.amqp_batch import AmqpBatchPublisher
from pool.publisher import Publisher, create_publisher
from pool.redis_batch import RedisBatchPublisher
from pool.store import ClaimedRow
from tests.helpers import comparable, decode_celery_message, make_settings

# Text as drivers hand it back: any code point, lone surrogates and NUL included, bytes (BLOB
# columns on SQLite), and the characters repr and JSON escape.
valid_text = st.one_of(
    st.text(max_size=40),
    st.text(st.sampled_from("'\"\\\x00\n\t%{}()s\u2028\x7f\x85é😀"), max_size=20),
    st.text(max_size=1).map(lambda c: c * 1100),  # past argsrepr's 1024-character cut
    st.text(max_size=40).map(str.encode),
)
any_text = st.one_of(valid_text, valid_text, st.text(st.characters(exclude_categories=()), max_size=20),
                     st.binary(max_size=20))
zones = st.one_of(
    st.timezones(),
    st.builds(lambda m: timezone(timedelta(minutes=m)), st.integers(-1439, 1439)),
)
valid_times = st.one_of(
    st.datetimes(),  # naive: UTC by pool's rule
    st.datetimes(timezones=zones),
    st.dates(),
    st.datetimes().map(lambda t: t.isoformat(sep=" ")),  # SQLite's text times
    st.datetimes(timezones=zones).map(datetime.isoformat),
    st.integers(-(2**35), 2**35),  # epoch seconds, some past year 9999
)
times = st.one_of(valid_times, valid_times, valid_times,
                  st.one_of(st.floats(allow_nan=True, allow_infinity=True), any_text))
numbers = st.one_of(
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.decimals(allow_nan=True, allow_infinity=True),
    st.floats(allow_nan=False).map(repr),
    any_text,
)
finite = st.one_of(st.integers(-(2**70), 2**70), st.floats(allow_nan=False, allow_infinity=False),
                  st.decimals(-(10**20), 10**20, places=6))
ids = st.one_of(st.integers(-(2**63), 2**63 - 1), st.integers(0, 10**25).map(Decimal))


@st.composite
def a_row(draw: st.DrawFn) -> ClaimedRow:
    # NULL name or value, and values that are no number, reject the row; rarely enough that most
    # rows of a batch are sent and compared.
    name = draw(st.one_of(st.none(), st.integers())) if draw(st.integers(0, 9)) == 0 else draw(valid_text)
    value = draw(st.one_of(st.none(), numbers)) if draw(st.integers(0, 3)) == 0 else draw(finite)
    source = draw(st.one_of(st.none(), valid_text, valid_text, any_text))
    return ClaimedRow(id=draw(ids), name=name, value=value, source=source,
                      timestamp=draw(st.one_of(st.none(), times)), attempts=0)


batches = st.lists(a_row(), min_size=1, max_size=6, unique_by=lambda r: int(r.id))
# The second 01:00 of a night the clocks went back (fold=1) is an hour after the first.
IN_A_FOLD = [ClaimedRow(id=fold + 1, name="n", value=1, source=None, attempts=0,
                        timestamp=datetime(2000, 10, 29, 1, 0, fold=fold, tzinfo=ZoneInfo("America/Chicago")))
             for fold in (0, 1)]
PROPERTY = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(autouse=True)
def far_from_utc(monkeypatch):
    # A naive time read as local time would pass unnoticed on a UTC machine.
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def same_instant(sent: str | None, stored: object) -> None:
    """The timestamp a worker receives names the instant the row holds (naive = UTC)."""
    if isinstance(stored, datetime):
        expected = stored if stored.tzinfo else stored.replace(tzinfo=UTC)
        # By POSIX time, not ==: PEP 495 makes an inter-zone == False for any time in a
        # repeated hour (a DST fold), even when both name the same instant.
        assert datetime.fromisoformat(sent).timestamp() == expected.timestamp()
    elif isinstance(stored, date):
        assert sent == stored.isoformat()
    elif stored is None:
        assert sent is None


def assert_payloads_hold_the_rows(messages: list[dict], batch: list[ClaimedRow]) -> None:
    rows = {f"signal-{int(row.id)}": row for row in batch}
    for message in messages:
        row = rows[message["id"]]
        (payload,) = message["args"]
        assert message["kwargs"] == {}
        assert payload["id"] == int(row.id) and payload["id"].__class__ is int
        same_instant(payload["timestamp"], row.timestamp)


def test_redis_batch_messages_equal_send_task_messages_for_any_rows(redis_url, queue_name):
    settings_ = make_settings(broker_url=redis_url, queue=queue_name)
    reference, batched = Publisher(settings_), create_publisher(settings_)
    assert isinstance(batched, RedisBatchPublisher)
    client = redis.Redis.from_url(redis_url)

    def published(publisher: Publisher, batch: list[ClaimedRow]) -> tuple[object, list[bytes]]:
        result = publisher.publish(batch)
        raw = client.lrange(queue_name, 0, -1)
        client.delete(queue_name)
        return result, raw

    compared: list[int] = []

    @PROPERTY
    @given(batch=batches)
    @example(batch=IN_A_FOLD)
    def check(batch: list[ClaimedRow]) -> None:
        by_send_task, sent_raw = published(reference, batch)
        by_batch, batch_raw = published(batched, batch)
        assert by_batch == by_send_task
        compared.append(len(by_batch.accepted))
        assert [comparable(m) for m in batch_raw] == [comparable(m) for m in sent_raw]
        assert_payloads_hold_the_rows([decode_celery_message(m) for m in batch_raw], batch)

    try:
        check()
    finally:
        reference.close()
        batched.close()
        client.close()
    assert sum(compared) >= 40, f"only {sum(compared)} rows were sent and compared"


def amqp_messages(publisher: Publisher, queue: str) -> list[dict]:
    """Every message on `queue`, taken off it, as the fields a worker reads."""
    found = []
    with publisher.app.connection_for_write() as conn:
        channel = conn.default_channel
        while (message := channel.basic_get(queue, no_ack=True)) is not None:
            properties = dict(message.properties)
            headers = properties.pop("application_headers")
            # Per process and per Celery app: there must be one, whatever it is.
            headers["origin"] = bool(headers.get("origin"))
            properties["reply_to"] = bool(properties.get("reply_to"))
            info = message.delivery_info
            found.append({"body": message.body, "headers": headers, "properties": properties,
                          "exchange": info["exchange"], "routing_key": info["routing_key"]})
    return found


def test_amqp_batch_messages_equal_send_task_messages_for_any_rows(amqp_url, queue_name):
    settings_ = make_settings(broker_url=amqp_url, queue=queue_name)
    reference, batched = Publisher(settings_), create_publisher(settings_)
    assert isinstance(batched, AmqpBatchPublisher)

    compared: list[int] = []

    @settings(PROPERTY, max_examples=30)
    @given(batch=batches)
    @example(batch=IN_A_FOLD)
    def check(batch: list[ClaimedRow]) -> None:
        by_send_task = reference.publish(batch)
        sent = amqp_messages(reference, queue_name) if by_send_task.accepted else []
        by_batch = batched.publish(batch)
        assert by_batch == by_send_task
        got = amqp_messages(reference, queue_name) if by_batch.accepted else []
        compared.append(len(got))
        assert got == sent
        assert_payloads_hold_the_rows(
            [{"id": m["headers"]["id"], "args": json.loads(m["body"])[0], "kwargs": json.loads(m["body"])[1]}
             for m in got], batch)

    try:
        check()
    finally:
        with reference.app.connection_for_write() as conn:
            conn.default_channel.queue_delete(queue_name)
        reference.close()
        batched.close()
    assert sum(compared) >= 20, f"only {sum(compared)} rows were sent and compared"
