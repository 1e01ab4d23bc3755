"""A broker that keeps its connections open but stops answering (a hung RabbitMQ or Redis, a
resource alarm, a network that drops packets without a reset) must cost the poller a bounded
wait, never its life: every call pool makes on a broker connection gives up in seconds, and the
rows it held go back unsent."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

import pytest

from pool.publisher import BROKER_IO_TIMEOUT, create_publisher
from pool.queue_depth import QueueDepth
from pool.store import ClaimedRow
from tests.helpers import make_settings
from tests.tcp_proxy import TcpProxy

# A call that would wait forever is ended by cutting its connection after this long: the test
# then fails on its elapsed time instead of hanging the suite.
SAFETY_CUT = 20.0


@contextmanager
def behind_a_proxy(url: str) -> Iterator[tuple[str, TcpProxy]]:
    upstream = urlsplit(url)
    proxy = TcpProxy(upstream.hostname, upstream.port)
    safety = threading.Timer(SAFETY_CUT, proxy.cut)
    safety.start()
    try:
        yield url.replace(f"{upstream.hostname}:{upstream.port}", f"127.0.0.1:{proxy.port}"), proxy
    finally:
        safety.cancel()
        proxy.cut()


def timed(call):
    started = time.monotonic()
    result = call()
    return result, time.monotonic() - started


@pytest.fixture(params=["amqp", "redis"])
def broker_url(request, queue_name) -> str:
    return request.getfixturevalue(f"{request.param}_url")


def test_queue_depth_on_a_broker_that_went_silent_is_unknown_within_seconds(broker_url, queue_name):
    with behind_a_proxy(broker_url) as (url, proxy):
        depth = QueueDepth(make_settings(broker_url=url, queue=queue_name))
        assert depth.depth() == 0
        proxy.hold()
        found, elapsed = timed(depth.depth)
        assert found is None
        assert elapsed < 6, f"the depth read waited {elapsed:.1f} s"
        _, elapsed = timed(depth.close)
        assert elapsed < 6, f"close waited {elapsed:.1f} s"


def test_closing_a_publisher_whose_broker_went_silent_returns_within_seconds(broker_url, queue_name):
    rows = [ClaimedRow(id=i, name="n", value=1.0, source=None, timestamp=None, attempts=0) for i in (1, 2)]
    with behind_a_proxy(broker_url) as (url, proxy):
        publisher = create_publisher(make_settings(broker_url=url, queue=queue_name))
        assert publisher.publish(rows).accepted == [1, 2]
        proxy.hold()
        _, elapsed = timed(publisher.close)
        # A graceful AMQP close waits for the broker's Close-OK twice (channel, connection): each
        # wait is bounded by the socket timeout.
        assert elapsed < 2 * BROKER_IO_TIMEOUT + 2, f"close waited {elapsed:.1f} s"
