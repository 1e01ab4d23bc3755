"""Fixtures for real services. Locally a missing service skips; under CI=true it fails."""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

PG_BASE = os.environ.get("POOL_TEST_PG", "postgresql://root@127.0.0.1:5432/test")
REDIS_HOST = os.environ.get("POOL_TEST_REDIS", "127.0.0.1:6379")
RABBIT_URL = os.environ.get("POOL_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672//")

# Several suites may run at once on one machine (one per work tree); each can be given its own
# Redis database numbers, e.g. POOL_TEST_REDIS_DBS=4,5,6, so that one's flushdb never empties another's.
# Under pytest-xdist each worker takes its own share of them, for the same reason.
def _own_redis_numbers() -> list[int]:
    numbers = [int(n) for n in os.environ.get("POOL_TEST_REDIS_DBS", "").split(",") if n.strip()]
    numbers = numbers or list(range(1, 16))
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if worker.startswith("gw") and workers > 1:
        share = numbers[int(worker[2:]) % workers::workers]
        if not share:
            raise RuntimeError(f"{len(numbers)} Redis databases cannot be shared by {workers} workers")
        return share
    return numbers


_redis_numbers = itertools.cycle(_own_redis_numbers())


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def require_service(name: str, host: str, port: int) -> None:
    if _reachable(host, port):
        return
    message = f"{name} is not reachable on {host}:{port}"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message} (CI=true: a missing service is a failure)")
    pytest.skip(message)


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A PostgreSQL URL whose search_path is a fresh schema, dropped after the test."""
    require_service("PostgreSQL", "127.0.0.1", 5432)
    import psycopg

    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_BASE, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    yield f"{PG_BASE}?options={quote(f'-csearch_path={schema}')}"
    with psycopg.connect(PG_BASE, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A Redis URL on a database number of its own, empty at the start."""
    host, port = REDIS_HOST.split(":")
    require_service("Redis", host, int(port))
    import redis

    with _redis_database() as number:
        url = f"redis://{REDIS_HOST}/{number}"
        client = redis.Redis.from_url(url)
        client.flushdb()
        yield url
        client.flushdb()
        client.close()


@contextlib.contextmanager
def _redis_database() -> Iterator[int]:
    """The next database number that no other test process on this machine holds right now.

    The cycle alone is not enough: mutation testing (scripts/mutation.sh) forks test processes
    from one parent, and each fork inherits the same position in the cycle, so two of them took
    the same number and one's flushdb emptied the other's. A lock file per number and server
    makes the choice exclusive across processes; the kernel drops the lock if a process dies."""
    lock_dir = Path(tempfile.gettempdir()) / "pool-test-redis-locks"
    lock_dir.mkdir(exist_ok=True)
    while True:
        for _ in range(16):
            number = next(_redis_numbers)
            lock = open(lock_dir / f"{REDIS_HOST.replace(':', '_')}-{number}.lock", "a")  # noqa: SIM115
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.close()
                continue
            try:
                yield number
            finally:
                lock.close()
            return
        time.sleep(0.1)  # every number is held by another process: wait for one to finish


@pytest.fixture
def amqp_url() -> str:
    require_service("RabbitMQ", "127.0.0.1", 5672)
    return RABBIT_URL


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'signals.db'}"


@pytest.fixture
def queue_name() -> str:
    return f"q_{uuid.uuid4().hex[:10]}"
