"""The batch publish path writes what Celery writes, and a real Celery worker runs it."""

from __future__ import annotations

import json
import uuid

import redis

from pool.publisher import PublishResult, create_publisher
from pool.redis_batch import RedisBatchPublisher
from pool.seeding import generate_signals
from pool.store import ClaimedRow
from tests.helpers import make_settings, redis_lpush_both_ways, redis_messages


def rows(count: int, start: int = 1) -> list[ClaimedRow]:
    return [ClaimedRow(id=start + i, attempts=0, **s)
            for i, s in enumerate(generate_signals(count, seed=start))]


def odd_rows() -> list[ClaimedRow]:
    """Values whose repr needs care: quotes, escapes, non-ASCII, NULLs, integers, long text,
    and format directives that must reach the broker as plain text."""
    base = rows(7)
    odd = [
        {"name": "quote ' and \"double\"", "source": None},
        {"name": "tab\tnew\nline \\ back", "value": 7},
        {"name": "\u00fcn\u00efc\u00f6de \u2603 \U0001F600", "source": "api"},
        {"name": "x" * 2000},
        {"value": -0.0, "timestamp": None},
        {},
        {"name": "100% %(body)s %s %%", "source": "{id}"},
    ]
    return [ClaimedRow(**{**vars(row), **change}) for row, change in zip(base, odd, strict=True)]


def publish_to_a_broker_that_is_down(broker_url: str, queue: str, count: int) -> PublishResult:
    """Publish rows 1..count through a publisher whose broker port has nothing listening."""
    down = create_publisher(make_settings(broker_url=broker_url, queue=queue))
    try:
        return down.publish(rows(count))
    finally:
        down.close()


def test_redis_batch_messages_equal_send_task_messages(redis_url, queue_name):
    settings = make_settings(broker_url=redis_url, queue=queue_name)
    batch = rows(3) + [ClaimedRow(**{**vars(r), "id": r.id + 3}) for r in odd_rows()]
    count = len(batch)
    probe = create_publisher(settings)
    probe.close()
    assert isinstance(probe, RedisBatchPublisher)
    accepted_by_send_task, by_send_task, accepted_by_batch, by_batch = redis_lpush_both_ways(settings, batch)
    assert accepted_by_send_task == accepted_by_batch == list(range(1, count + 1))
    assert by_batch == by_send_task
    # Queue order is publish order: the worker pops from the tail.
    assert [m["headers"]["id"] for m in by_batch] == [f"signal-{i}" for i in range(count, 0, -1)]


def test_redis_batch_is_one_atomic_push_and_reports_an_outage_as_unsent(redis_url, queue_name):
    settings = make_settings(broker_url=redis_url, queue=queue_name)
    publisher = create_publisher(settings)
    try:
        result = publisher.publish(rows(500))
        assert len(result.accepted) == 500
        assert publisher.publish(rows(500, start=501)).accepted == list(range(501, 1001))
        assert len({m["id"] for m in redis_messages(redis_url, queue_name)}) == 1000
        # The worker keeps unacknowledged messages under their delivery tag: each must be unique,
        # and a uuid in its usual form, as kombu's own tags are.
        raw = redis.Redis.from_url(redis_url).lrange(queue_name, 0, -1)
        tags = {json.loads(m)["properties"]["delivery_tag"] for m in raw}
        assert len(tags) == 1000
        assert all(str(uuid.UUID(tag)) == tag for tag in tags)
    finally:
        publisher.close()
    result = publish_to_a_broker_that_is_down("redis://127.0.0.1:1/0", queue_name, 5)
    assert result.accepted == [] and result.unsent == [1, 2, 3, 4, 5] and result.broker_error


def test_amqp_batch_counts_a_row_only_once_rabbitmq_confirmed_it(amqp_url, queue_name):
    from pool.amqp_batch import AmqpBatchPublisher
    from pool.queue_depth import QueueDepth

    settings = make_settings(broker_url=amqp_url, queue=queue_name)
    publisher = create_publisher(settings)
    assert isinstance(publisher, AmqpBatchPublisher)
    depth = QueueDepth(settings)
    try:
        first = publisher.publish(rows(300))
        second = publisher.publish(rows(200, start=301))
        assert first.accepted == list(range(1, 301)) and not first.unsent
        assert second.accepted == list(range(301, 501)) and not second.unsent
        assert depth.depth() == 500
    finally:
        with publisher.app.connection_for_write() as conn:
            conn.default_channel.queue_delete(queue_name)
        depth.close()
        publisher.close()
    result = publish_to_a_broker_that_is_down("amqp://guest:guest@127.0.0.1:1//", queue_name, 3)
    assert result.accepted == [] and result.unsent == [1, 2, 3] and result.broker_error
