"""What each publish path returns for the rows it could not send: rejected rows with their
reason while the others still go, the rest unsent on a stop or a broker outage, the publisher a
URL scheme gets, and a broker error stored without the broker's password."""

from __future__ import annotations

import time
from urllib.parse import urlsplit

import pytest

from pool.amqp_batch import AmqpBatchPublisher
from pool.publisher import Publisher, create_publisher
from pool.redis_batch import RedisBatchPublisher
from pool.seeding import generate_signals
from pool.store import ClaimedRow
from tests.helpers import filesystem_messages, make_settings, redis_lpush_both_ways, redis_messages
from tests.tcp_proxy import TcpProxy


def rows(count: int, start: int = 1) -> list[ClaimedRow]:
    return [ClaimedRow(id=start + i, attempts=0, **s)
            for i, s in enumerate(generate_signals(count, seed=start))]


def with_row(batch: list[ClaimedRow], row_id: int, **change) -> list[ClaimedRow]:
    return [ClaimedRow(**{**vars(r), **change}) if r.id == row_id else r for r in batch]


class Unprintable:
    """A value a database driver might hand over whose text form cannot be read."""

    def __str__(self) -> str:
        raise RuntimeError("no text form\nsecond line")


def stop_after(count: int, then=lambda: None):
    """keep_going() that says yes `count` times, then calls `then` and says no."""
    calls = []

    def keep_going() -> bool:
        calls.append(1)
        if len(calls) > count:
            then()
            return False
        return True
    return keep_going


def cut_before(number: int, proxy: TcpProxy):
    """keep_going() that cuts the broker off just before the `number`th row is sent."""
    calls = []

    def keep_going() -> bool:
        calls.append(1)
        if len(calls) == number:
            proxy.cut()
        return True
    return keep_going


@pytest.fixture
def fs_settings(tmp_path, queue_name):
    return make_settings(broker_url="filesystem://", broker_folder=str(tmp_path / "broker"),
                         queue=queue_name, max_payload_bytes="1024")


def test_send_task_path_rejects_a_row_with_its_reason_and_sends_the_others(fs_settings, tmp_path):
    batch = with_row(with_row(rows(5), 2, name="x" * 2000), 4, source=Unprintable())
    publisher = create_publisher(fs_settings)
    assert type(publisher) is Publisher
    try:
        result = publisher.publish(batch)
    finally:
        publisher.close()
    assert result.accepted == [1, 3, 5]
    assert result.rejected[2].startswith("payload is ") and "over the 1024-byte maximum" in result.rejected[2]
    assert result.rejected[4] == "RuntimeError: no text form"
    assert (result.unsent, result.failed, result.broker_error) == ([], {}, None)
    sent = filesystem_messages(tmp_path / "broker", fs_settings.queue)
    assert sorted(m["id"] for m in sent) == ["signal-1", "signal-3", "signal-5"]


def test_send_task_path_returns_the_rest_unsent_once_asked_to_stop(fs_settings, tmp_path):
    publisher = Publisher(fs_settings)
    try:
        result = publisher.publish(rows(5), keep_going=stop_after(2))
        # The publisher stays usable after a stop.
        again = publisher.publish(rows(1, start=6))
    finally:
        publisher.close()
    assert (result.accepted, result.unsent, result.broker_error) == ([1, 2], [3, 4, 5], None)
    assert again.accepted == [6]
    sent = filesystem_messages(tmp_path / "broker", fs_settings.queue)
    assert sorted(m["id"] for m in sent) == ["signal-1", "signal-2", "signal-6"]


def test_send_task_path_leaves_the_rest_unsent_when_the_broker_goes_mid_batch(redis_url, queue_name):
    """Redis through a proxy, cut after two rows went out: the rest come back unsent with the
    broker's error, at once (no retry), and the same publisher sends again once Redis is back."""
    upstream = urlsplit(redis_url)
    proxy = TcpProxy(upstream.hostname, upstream.port)
    url = f"redis://:pw-Secret-42@127.0.0.1:{proxy.port}{upstream.path}"
    publisher = Publisher(make_settings(broker_url=url, queue=queue_name))
    try:
        started = time.monotonic()
        result = publisher.publish(rows(5), keep_going=cut_before(3, proxy))
        elapsed = time.monotonic() - started
        assert (result.accepted, result.unsent, result.failed) == ([1, 2], [3, 4, 5], {})
        assert result.broker_error.startswith(("OperationalError: ", "ConnectionError: "))
        assert "pw-Secret-42" not in result.broker_error
        assert elapsed < 0.5, f"a lost broker took {elapsed:.1f} s to report: retried?"
        proxy.restore()
        assert publisher.publish(rows(2, start=6)).accepted == [6, 7]
    finally:
        publisher.close()
        proxy.close()
    assert sorted(m["id"] for m in redis_messages(redis_url, queue_name)) == [
        "signal-1", "signal-2", "signal-6", "signal-7"]


def test_a_broker_error_is_stored_without_the_broker_password():
    url = "amqp://user:pw-Secret-42@127.0.0.1:1/vhost"
    publisher = Publisher(make_settings(broker_url=url))
    try:
        described = publisher._describe(OSError(f"cannot reach {url}\nmore detail"))
        # A client library quoting the password alone, outside any URL (urllib on a password
        # that breaks the URL's parsing does so).
        bare = publisher._describe(ValueError("Port could not be cast to integer value as 'pw-Secret-42'"))
    finally:
        publisher.close()
    assert described.startswith("OSError: cannot reach amqp://user:")
    assert "pw-Secret-42" not in described and "more detail" not in described
    assert bare.startswith("ValueError: Port could not be cast") and "pw-Secret-42" not in bare


def test_a_refused_broker_costs_one_retry_not_more():
    publisher = Publisher(make_settings(broker_url="redis://127.0.0.1:1/0"))
    try:
        started = time.monotonic()
        result = publisher.publish(rows(2))
        elapsed = time.monotonic() - started
    finally:
        publisher.close()
    assert result.unsent == [1, 2] and result.broker_error
    # kombu waits 2 s before its one retry; a second retry would add 4 s more.
    assert elapsed < 4.5, f"a refused broker took {elapsed:.1f} s"


@pytest.mark.parametrize(("url", "kind"), [
    ("redis://127.0.0.1:1/0", RedisBatchPublisher),
    ("rediss://127.0.0.1:1/0?ssl_cert_reqs=required", RedisBatchPublisher),
    ("amqp://guest:guest@127.0.0.1:1//", AmqpBatchPublisher),
    ("amqps://guest:guest@127.0.0.1:1//", AmqpBatchPublisher),
    ("pyamqp://guest:guest@127.0.0.1:1//", AmqpBatchPublisher),
    ("filesystem://", Publisher),
    ("memory://", Publisher),
])
def test_each_broker_scheme_gets_its_publisher(url, kind, tmp_path):
    publisher = create_publisher(make_settings(broker_url=url, broker_folder=str(tmp_path)))
    try:
        assert type(publisher) is kind
    finally:
        publisher.close()


def test_a_batch_asked_to_stop_before_it_starts_sends_nothing(redis_url, queue_name):
    publisher = create_publisher(make_settings(broker_url=redis_url, queue=queue_name,
                                               max_payload_bytes="1024"))
    try:
        stopped = publisher.publish(rows(3), keep_going=lambda: False)
        mixed = publisher.publish(with_row(rows(3, start=4), 5, name="x" * 2000))
    finally:
        publisher.close()
    assert (stopped.accepted, stopped.unsent, stopped.broker_error) == ([], [1, 2, 3], None)
    assert mixed.accepted == [4, 6] and list(mixed.rejected) == [5] and not mixed.unsent
    assert sorted(m["id"] for m in redis_messages(redis_url, queue_name)) == ["signal-4", "signal-6"]


def test_redis_batch_after_an_outage_sends_again_once_redis_is_back(redis_url, queue_name):
    upstream = urlsplit(redis_url)
    proxy = TcpProxy(upstream.hostname, upstream.port)
    url = f"redis://127.0.0.1:{proxy.port}{upstream.path}"
    publisher = create_publisher(make_settings(broker_url=url, queue=queue_name))
    try:
        assert publisher.publish(rows(2)).accepted == [1, 2]
        proxy.cut()
        lost = publisher.publish(rows(2, start=3))
        assert (lost.accepted, lost.unsent) == ([], [3, 4])
        assert lost.broker_error.startswith(("OperationalError: ", "ConnectionError: "))
        proxy.restore()
        assert publisher.publish(rows(2, start=5)).accepted == [5, 6]
        assert publisher.publish(rows(1, start=7)).accepted == [7]
    finally:
        publisher.close()
        proxy.close()
    assert sorted(m["id"] for m in redis_messages(redis_url, queue_name)) == [
        f"signal-{i}" for i in (1, 2, 5, 6, 7)]


def amqp_messages(amqp_url: str, queue_name: str) -> list[dict]:
    """Every message on a RabbitMQ queue as a worker receives it, taking them off it."""
    from kombu import Connection

    with Connection(amqp_url) as conn:
        channel = conn.channel()
        found = []
        while (message := channel.basic_get(queue_name, no_ack=True)) is not None:
            properties = {k: v for k, v in message.properties.items() if k != "reply_to"}
            found.append({"headers": message.headers, "properties": properties,
                          "body": message.body, "content_type": message.content_type,
                          "content_encoding": message.content_encoding,
                          "routing_key": message.delivery_info["routing_key"],
                          "replied_to": bool(message.properties.get("reply_to"))})
        conn.default_channel.queue_delete(queue_name)
        return found


def test_amqp_batch_messages_equal_send_task_messages(amqp_url, queue_name):
    """A batch RabbitMQ confirmed reports no error, and what lands on a queue that did not
    exist before is what send_task publishes, field by field."""
    settings = make_settings(broker_url=amqp_url, queue=queue_name)
    reference = Publisher(settings)
    batched = create_publisher(settings)
    assert type(batched) is AmqpBatchPublisher
    batch = rows(4)
    try:
        assert reference.publish(batch).accepted == [1, 2, 3, 4]
        by_send_task = amqp_messages(amqp_url, queue_name)  # deletes the queue
        result = batched.publish(batch)
        assert (result.accepted, result.unsent, result.broker_error) == ([1, 2, 3, 4], [], None)
        by_batch = amqp_messages(amqp_url, queue_name)
        again = batched.publish(rows(2, start=5))
        assert (again.accepted, again.broker_error) == ([5, 6], None)
    finally:
        reference.close()
        batched.close()
    for message in by_send_task + by_batch:
        message["headers"].pop("origin")
    assert by_batch == by_send_task
    assert [m["headers"]["id"] for m in by_batch] == [f"signal-{i}" for i in (1, 2, 3, 4)]
    assert all(m["replied_to"] for m in by_batch)


def test_amqp_nacked_rows_come_back_unsent_at_once_with_the_count(amqp_url, queue_name):
    from kombu import Exchange, Queue

    publisher = create_publisher(make_settings(broker_url=amqp_url, queue=queue_name))
    # A queue that holds two messages and nacks any publish beyond them: a real refusal.
    bounded = {"x-max-length": 2, "x-overflow": "reject-publish"}
    publisher.app.conf.task_queues = [Queue(queue_name, Exchange(queue_name), routing_key=queue_name,
                                            queue_arguments=bounded)]
    try:
        started = time.monotonic()
        result = publisher.publish(rows(5))
        elapsed = time.monotonic() - started
    finally:
        amqp_messages(amqp_url, queue_name)
        publisher.close()
    assert (result.accepted, result.unsent) == ([1, 2], [3, 4, 5])
    assert result.broker_error == "RabbitMQ nacked 3 message(s)"
    # Settled by the nacks themselves, not by waiting out the confirm timeout.
    assert elapsed < 5, f"{elapsed:.1f} s"


def test_amqp_confirms_that_never_come_end_the_batch_with_the_rows_unsent(amqp_url, queue_name, monkeypatch):
    import threading

    import pool.amqp_batch

    monkeypatch.setattr(pool.amqp_batch, "CONFIRM_TIMEOUT", 2.0)
    upstream = urlsplit(amqp_url)
    proxy = TcpProxy(upstream.hostname, upstream.port)
    url = amqp_url.replace(f"{upstream.hostname}:{upstream.port}", f"127.0.0.1:{proxy.port}")
    publisher = create_publisher(make_settings(broker_url=url, queue=queue_name))
    # Should the wait never end, cutting the connection ends it (late, so the test fails).
    safety = threading.Timer(8, proxy.cut)
    try:
        assert publisher.publish(rows(2)).accepted == [1, 2]
        proxy.hold()  # RabbitMQ goes silent: no confirm comes back
        safety.start()
        started = time.monotonic()
        result = publisher.publish(rows(3, start=3))
        elapsed = time.monotonic() - started
        assert (result.accepted, result.unsent) == ([], [3, 4, 5])
        # What the rows' error says: no confirm, not the socket read's bare "timed out".
        assert result.broker_error == "TimeoutError: no publisher confirm for 3 message(s)"
        # The confirm timeout, then the broken connection dropped without waiting for RabbitMQ,
        # and dropped for good, not left open while the publisher makes a new one. Under the
        # socket's own read timeout (BROKER_IO_TIMEOUT, 5 s): the confirm timeout is what ends it.
        assert 1.8 < elapsed < 4.5, f"{elapsed:.1f} s"
        assert proxy.client_connections() == 0
        safety.cancel()
        proxy.cut()
        proxy.restore()  # RabbitMQ answers again: the same publisher sends
        assert publisher.publish(rows(1, start=6)).accepted == [6]
    finally:
        safety.cancel()
        proxy.cut()
        publisher.close()
        proxy.close()
        amqp_messages(amqp_url, queue_name)


def test_redis_batch_messages_equal_send_task_messages_for_a_task_name_holding_percent(
        redis_url, queue_name):
    """The batch template is a %-format string: a '%' in the task name is text, not a slot."""
    settings = make_settings(broker_url=redis_url, queue=queue_name, task_name="app.tasks.100%_%(id)s%s")
    sent_task, by_send_task, sent_batch, by_batch = redis_lpush_both_ways(settings, rows(2))
    assert sent_task == sent_batch == [1, 2]
    assert by_batch == by_send_task
    assert {m["headers"]["task"] for m in by_batch} == {"app.tasks.100%_%(id)s%s"}


def through_proxy(url: str) -> tuple[TcpProxy, str]:
    """A TcpProxy in front of the broker of `url`, and the URL that goes through it."""
    upstream = urlsplit(url)
    proxy = TcpProxy(upstream.hostname, upstream.port)
    return proxy, url.replace(f"{upstream.hostname}:{upstream.port}", f"127.0.0.1:{proxy.port}", 1)


@pytest.mark.parametrize("path", ["send_task on Redis", "Redis batch", "RabbitMQ batch"])
def test_a_closed_publisher_leaves_no_connection_to_the_broker_open(path, redis_url, amqp_url, queue_name):
    """One connection per outage or per restart left open would pile up on the broker."""
    proxy, url = through_proxy(amqp_url if "RabbitMQ" in path else redis_url)
    settings = make_settings(broker_url=url, queue=queue_name)
    publisher = Publisher(settings) if path.startswith("send_task") else create_publisher(settings)
    try:
        assert publisher.publish(rows(2)).accepted == [1, 2]
        assert proxy.client_connections() > 0
        publisher.close()
        assert proxy.client_connections() == 0
    finally:
        publisher.close()
        proxy.close()
        if "RabbitMQ" in path:
            amqp_messages(amqp_url, queue_name)


def test_a_closed_amqp_publisher_says_goodbye_to_rabbitmq(amqp_url, queue_name):
    """close() ends the connection with AMQP's close handshake, which RabbitMQ answers: a
    connection just dropped is logged by RabbitMQ as closed unexpectedly, once per restart."""
    proxy, url = through_proxy(amqp_url)
    publisher = create_publisher(make_settings(broker_url=url, queue=queue_name))
    try:
        assert publisher.publish(rows(1)).accepted == [1]
        answered = proxy.bytes_from_upstream
        publisher.close()
        assert proxy.bytes_from_upstream > answered, "RabbitMQ was sent no close to answer"
        assert proxy.client_connections() == 0
    finally:
        publisher.close()
        proxy.close()
        amqp_messages(amqp_url, queue_name)


def test_a_queue_rabbitmq_refuses_to_declare_fails_the_batch_with_rabbitmqs_refusal(amqp_url, queue_name):
    """The queue held exclusively by another client: RabbitMQ refuses its declare. The batch
    ends at once with RabbitMQ's own refusal and its rows unsent, for the poller to retry; kombu
    does not retry the declare behind its back (that would end in kombu's OperationalError, and
    on a lost connection would publish on a new channel, one without the batch's confirm
    tracking)."""
    from kombu import Connection, Queue

    publisher = create_publisher(make_settings(broker_url=amqp_url, queue=queue_name))
    with Connection(amqp_url) as owner:
        Queue(queue_name, exclusive=True, channel=owner.channel()).declare()
        try:
            result = publisher.publish(rows(3))
        finally:
            publisher.close()
    assert (result.accepted, result.unsent) == ([], [1, 2, 3])
    assert result.broker_error.startswith("ResourceLocked: Queue.declare: (405) RESOURCE_LOCKED")
