"""A message RabbitMQ refuses (a publisher nack) is a broker error: the row is not accepted,
not charged an attempt, and relayed once the broker takes it again."""

from __future__ import annotations

from kombu import Exchange, Queue

from pool.poller import Poller, PollerIdentity, StopSignal
from pool.publisher import create_publisher
from pool.store import open_store
from tests.helpers import make_settings


def test_rows_rabbitmq_nacks_are_released_for_a_retry_never_counted_as_published(
        amqp_url, sqlite_url, queue_name):
    settings = make_settings(db_url=sqlite_url, broker_url=amqp_url, queue=queue_name, batch_size="5")
    store = open_store(settings)
    store.init_schema()
    store.insert_signals([{"name": "n", "value": float(i), "source": "s", "timestamp": "2024-01-01"}
                          for i in range(1, 6)])
    publisher = create_publisher(settings)
    # A queue that holds two messages and nacks any publish beyond them: a real refusal.
    bounded = {"x-max-length": 2, "x-overflow": "reject-publish"}
    publisher.app.conf.task_queues = [Queue(queue_name, Exchange(queue_name), routing_key=queue_name,
                                            queue_arguments=bounded)]
    poller = Poller(store, publisher, PollerIdentity("t", 0, 1), settings, StopSignal())
    try:
        assert poller.run_once() == 5
        counts = store.counts()
        assert (counts.processed, counts.unprocessed, counts.dead) == (2, 3, 0)
        claim = store.claim("again", 1, 0, 5, 30)
        # Released at once, without an attempt: the broker, not the row, was the problem.
        assert [(r.id, r.attempts) for r in claim.rows] == [(3, 0), (4, 0), (5, 0)]
    finally:
        with publisher.app.connection_for_write() as conn:
            conn.default_channel.queue_delete(queue_name)
        poller.close()
        publisher.close()
        store.close()
