"""Published rows reach a real broker as Celery messages that a real Celery worker executes."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from pool.publisher import Publisher, create_publisher
from pool.seeding import generate_signals
from pool.store import open_store
from tests.helpers import PoolProcess, clean_env, make_settings, redis_messages, wait_until


@pytest.fixture(params=["redis", "amqp", "filesystem"])
def relay(request, tmp_path, queue_name):
    """(settings, store) for one broker kind; PostgreSQL beside servers, SQLite beside files."""
    if request.param == "filesystem":
        settings = make_settings(db_url=request.getfixturevalue("sqlite_url"), broker_url="filesystem://",
                                 broker_folder=str(tmp_path / "broker"), queue=queue_name)
    else:
        broker = request.getfixturevalue("redis_url" if request.param == "redis" else "amqp_url")
        settings = make_settings(db_url=request.getfixturevalue("pg_url"), broker_url=broker,
                                 queue=queue_name)
    store = open_store(settings)
    store.init_schema()
    yield settings, store
    store.close()
    if request.param == "amqp":
        from pool.broker import create_celery_app

        with create_celery_app(settings).connection_for_write() as conn:
            conn.default_channel.queue_delete(queue_name)


def start_worker(settings, cwd) -> PoolProcess:
    env = clean_env(PULSE_DB_URL=settings.db_url, PULSE_BROKER_URL=settings.broker_url,
                    PULSE_BROKER_FOLDER=settings.broker_folder, PULSE_QUEUE=settings.queue)
    worker = PoolProcess("worker", "--concurrency", "1", env=env, cwd=cwd)
    worker.wait_for_line(r"ready\.", timeout=60)
    return worker


def scored(store) -> int:
    with store.engine.connect() as conn:
        return conn.execute(text("SELECT COUNT(*) FROM signal_scores")).scalar_one()


def test_redis_messages_are_celery_protocol_2_with_deterministic_ids(redis_url, pg_url, queue_name):
    settings = make_settings(db_url=pg_url, broker_url=redis_url, queue=queue_name)
    store = open_store(settings)
    store.init_schema()
    store.insert_signals(list(generate_signals(5, seed=1)))
    claim = store.claim("t", 1, 0, 10, 30)
    publisher = Publisher(settings)
    try:
        result = publisher.publish(claim.rows)
    finally:
        publisher.close()
        store.close()
    assert result.accepted == [1, 2, 3, 4, 5] and not result.rejected and not result.unsent
    messages = redis_messages(redis_url, queue_name)
    assert sorted(m["id"] for m in messages) == [f"signal-{i}" for i in range(1, 6)]
    first = next(m for m in messages if m["id"] == "signal-1")
    assert first["task"] == "ingest_and_score_signal"
    payload = first["args"][0]
    assert set(payload) == {"id", "name", "value", "source", "timestamp"}
    assert payload["id"] == 1 and isinstance(payload["timestamp"], str) and "T" in payload["timestamp"]


def test_a_real_celery_worker_executes_every_task_once_even_when_redelivered(relay, tmp_path):
    settings, store = relay
    store.insert_signals(list(generate_signals(20, seed=2)))
    claim = store.claim("t", 1, 0, 100, 30)
    # The path pool uses for this broker: Redis and RabbitMQ batches, send_task on the filesystem.
    publisher = create_publisher(settings)
    try:
        assert len(publisher.publish(claim.rows).accepted) == 20
        # A crash between publish and ack re-publishes the batch with the same task ids.
        assert len(publisher.publish(claim.rows).accepted) == 20
    finally:
        publisher.close()
    worker = start_worker(settings, tmp_path)
    try:
        wait_until(lambda: worker.output().count("succeeded") >= 40, timeout=60,
                   message="the worker to run all 40 deliveries")
    finally:
        worker.signal()
        worker.wait(timeout=30)
    for row_id in (1, 20):
        assert worker.output().count(f"[signal-{row_id}] succeeded") == 2
    assert scored(store) == 20
