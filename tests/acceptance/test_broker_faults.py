"""Broker faults beyond a refused connection: lost mid-run, or configured wrong.

A broker that fails while batches flow is an outage: the batch's rows are released at once
(not after their lease) and the poller stays alive and retries. A broker that can never work
as configured (wrong password, unknown vhost, unparsable URL) is found at start: exit 2, one line.
"""

from __future__ import annotations

import signal
from urllib.parse import urlsplit

import psycopg
import pytest

from tests.acceptance.test_faults import with_port
from tests.helpers import PoolProcess, clean_env, run_pool, wait_until
from tests.tcp_proxy import TcpProxy

LEASE_SECONDS = 120  # far longer than the test waits: rows freed by lease expiry would not count


def table_state(pg_url: str) -> dict[str, int]:
    with psycopg.connect(pg_url) as conn:
        processed, pending, leased = conn.execute(
            "SELECT COUNT(*) FILTER (WHERE processed = 1), COUNT(*) FILTER (WHERE processed = 0),"
            " COUNT(*) FILTER (WHERE processed = 0 AND lease_owner IS NOT NULL) FROM signals"
        ).fetchone()
    return {"processed": processed, "pending": pending, "leased": leased}


@pytest.mark.parametrize("broker", ["redis", "amqp"])
def test_a_broker_lost_mid_run_releases_the_batch_at_once_and_the_poller_lives_on(broker, request, pg_url,
                                                                                   queue_name, tmp_path):
    real = request.getfixturevalue("redis_url" if broker == "redis" else "amqp_url")
    upstream = urlsplit(real)
    proxy = TcpProxy(upstream.hostname, upstream.port)
    env = clean_env(PULSE_DB_URL=pg_url, PULSE_BROKER_URL=with_port(real, proxy.port), PULSE_QUEUE=queue_name,
                    PULSE_BATCH_SIZE="10", PULSE_DB_POLL_INTERVAL="0.2",
                    PULSE_LEASE_SECONDS=str(LEASE_SECONDS), PULSE_BACKPRESSURE_HIGH="0")
    assert run_pool("init-db", env=env, cwd=tmp_path).returncode == 0
    pool = PoolProcess("start", "--workers", "1", "--metrics-port", "0", env=env, cwd=tmp_path)
    try:
        pid = pool.wait_for_line(r"started poller-0 \(pid (\d+)\)")[1]
        pool.wait_for_line(r"ready: 1 pollers")
        # The first batches go out, so the publisher holds an open connection when it is cut.
        assert run_pool("seed", "--count", "30", env=env, cwd=tmp_path).returncode == 0
        wait_until(lambda: table_state(pg_url)["processed"] == 30, timeout=60, message="the first batches")
        proxy.cut()
        assert run_pool("seed", "--count", "50", env=env, cwd=tmp_path).returncode == 0
        pool.wait_for_line(r"broker unavailable", timeout=60)
        # Released at once, retried, and never marked processed while the broker is away.
        wait_until(lambda: table_state(pg_url) == {"processed": 30, "pending": 50, "leased": 0}, timeout=20,
                   message="the failed batch's rows released long before their lease ends")
        proxy.restore()
        wait_until(lambda: table_state(pg_url)["processed"] == 80, timeout=90,
                   message="relaying to resume after the outage")
        pool.wait_for_line(r"broker reachable again")
        pool.signal(signal.SIGTERM)
        assert pool.wait(timeout=60) == 0, pool.output()
    finally:
        pool.kill()
        proxy.close()
    output = pool.output()
    assert "exited with code" not in output and "Traceback" not in output, output
    assert f"(pid {pid})" in output and "started poller-0" in output
    assert output.count("started poller-0") == 1  # the same poller all along


def amqp_with(amqp_url: str, password: str | None = None, vhost: str | None = None) -> str:
    parts = urlsplit(amqp_url)
    netloc = f"{parts.username}:{password or parts.password}@{parts.hostname}:{parts.port}"
    return parts._replace(netloc=netloc, path=f"/{vhost}" if vhost else parts.path).geturl()


BAD_BROKERS = {
    "wrong AMQP password": (lambda amqp, redis: amqp_with(amqp, password="not-the-password-42"),
                            "ACCESS_REFUSED"),
    "unknown AMQP vhost": (lambda amqp, redis: amqp_with(amqp, vhost="pool-no-such-vhost"),
                           "vhost pool-no-such-vhost not found"),
    "non-numeric Redis port": (lambda amqp, redis: "redis://:pw-secret-42@127.0.0.1:notaport/5",
                               "the port must be a number"),
    "Redis database number out of range": (lambda amqp, redis: redis.rsplit("/", 1)[0] + "/999",
                                           "DB index is out of range"),
}


@pytest.mark.parametrize("command", [("start", "--workers", "1", "--metrics-port", "0"),
                                     ("poller", "--slot", "0")])
@pytest.mark.parametrize("make_url, expected", BAD_BROKERS.values(), ids=BAD_BROKERS.keys())
def test_a_broker_that_cannot_work_as_configured_is_one_line_and_exit_2_at_start(
        make_url, expected, command, amqp_url, redis_url, pg_url, tmp_path):
    broker_url = make_url(amqp_url, redis_url)
    env = clean_env(PULSE_DB_URL=pg_url, PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "metrics"))
    assert run_pool("init-db", env=env, cwd=tmp_path).returncode == 0
    result = run_pool(*command, env={**env, "PULSE_BROKER_URL": broker_url}, cwd=tmp_path, timeout=60)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pool: error:") and expected in lines[0], result.stderr
    for secret in ("not-the-password-42", "pw-secret-42"):
        assert secret not in result.stderr + result.stdout


def test_an_unreachable_broker_at_start_is_an_outage_not_a_configuration_error(pg_url, tmp_path):
    env = clean_env(PULSE_DB_URL=pg_url, PULSE_BROKER_URL="redis://127.0.0.1:1/0")
    assert run_pool("init-db", env=env, cwd=tmp_path).returncode == 0
    pool = PoolProcess("start", "--workers", "1", "--metrics-port", "0", env=env, cwd=tmp_path)
    try:
        pool.wait_for_line(r"broker redis://127\.0\.0\.1:1/0 unreachable at start; the pollers retry")
        pool.wait_for_line(r"ready: 1 pollers")
        pool.signal(signal.SIGTERM)
        assert pool.wait(timeout=60) == 0, pool.output()
    finally:
        pool.kill()


class RefusingBroker:
    """A broker that refuses every publish to the queue with an error of its own, not a
    connection error: on Redis the queue's key holds a string (WRONGTYPE), on RabbitMQ the queue
    exists with other arguments (PRECONDITION_FAILED). `fix()` clears it up."""

    def __init__(self, broker: str, url: str, queue: str) -> None:
        self.broker, self.url, self.queue = broker, url, queue
        if broker == "redis":
            import redis

            with redis.Redis.from_url(url) as client:
                client.set(queue, "not a list")
        else:
            with self._channel() as channel:
                channel.queue_declare(queue, durable=False, auto_delete=False)

    def _channel(self):
        import contextlib

        from kombu import Connection

        @contextlib.contextmanager
        def opened():
            with Connection(self.url) as connection:
                yield connection.default_channel
        return opened()

    def fix(self) -> None:
        if self.broker == "redis":
            import redis

            with redis.Redis.from_url(self.url) as client:
                client.delete(self.queue)
        else:
            with self._channel() as channel:
                channel.queue_delete(self.queue)


@pytest.mark.parametrize("broker", ["redis", "amqp"])
def test_a_broker_refusing_publishes_at_run_time_is_an_outage_that_releases_the_rows(broker, request, pg_url,
                                                                                     queue_name, tmp_path):
    url = request.getfixturevalue("redis_url" if broker == "redis" else "amqp_url")
    env = clean_env(PULSE_DB_URL=pg_url, PULSE_BROKER_URL=url, PULSE_QUEUE=queue_name, PULSE_BATCH_SIZE="10",
                    PULSE_DB_POLL_INTERVAL="0.2", PULSE_LEASE_SECONDS=str(LEASE_SECONDS),
                    PULSE_BACKPRESSURE_HIGH="0")
    assert run_pool("init-db", env=env, cwd=tmp_path).returncode == 0
    refusing = RefusingBroker(broker, url, queue_name)
    pool = PoolProcess("start", "--workers", "1", "--metrics-port", "0", env=env, cwd=tmp_path)
    try:
        pool.wait_for_line(r"ready: 1 pollers")
        assert run_pool("seed", "--count", "40", env=env, cwd=tmp_path).returncode == 0
        pool.wait_for_line(r"broker unavailable", timeout=60)
        wait_until(lambda: table_state(pg_url) == {"processed": 0, "pending": 40, "leased": 0}, timeout=20,
                   message="the refused batch's rows released long before their lease ends")
        refusing.fix()
        wait_until(lambda: table_state(pg_url)["processed"] == 40, timeout=90,
                   message="relaying to resume once the broker takes the messages")
        pool.signal(signal.SIGTERM)
        assert pool.wait(timeout=60) == 0, pool.output()
    finally:
        pool.kill()
        if broker == "amqp":
            refusing.fix()
    output = pool.output()
    assert "exited with code" not in output and "Traceback" not in output, output
    assert len([line for line in output.splitlines() if "broker unavailable" in line]) == 1
