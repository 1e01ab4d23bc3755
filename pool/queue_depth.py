"""How many messages wait in the broker queue, for backpressure."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from amqp.exceptions import NotFound

from pool.broker import broker_scheme, create_celery_app, with_short_timeouts
from pool.config import Settings

log = logging.getLogger(__name__)

AMQP_SCHEMES = ("amqp", "amqps", "pyamqp")
# The depth is advice: a broker that accepts TCP but never answers held every read for the
# transport's whole retry budget (12 s on Redis), and with it the first claim and readiness.
DEPTH_TIMEOUT = 1.0


class QueueDepth:
    """Reads the depth of `settings.queue`; None when the broker cannot tell right now."""

    def __init__(self, settings: Settings) -> None:
        self.queue = settings.queue
        self.is_amqp = broker_scheme(settings) in AMQP_SCHEMES
        self.is_redis = broker_scheme(settings) in ("redis", "rediss")
        self.app = create_celery_app(settings)
        self._connection = None
        self._channel = None
        self._redis_keys: list[str] = []
        self._redis: Any = None

    def _get_channel(self):
        if self._channel is None:
            if self._connection is None:
                self._connection = with_short_timeouts(self.app.connection_for_read(), DEPTH_TIMEOUT)
            # A channel of its own: a failed passive declare closes the channel it ran on.
            self._channel = self._connection.channel()
        return self._channel

    def depth(self) -> int | None:
        try:
            channel = self._get_channel()
            if self.is_amqp:
                try:
                    return channel.queue_declare(self.queue, passive=True).message_count
                except NotFound:
                    self._drop_channel()
                    return 0
            if self.is_redis:
                return self._redis_depth(channel)
            # Other virtual transports (filesystem): the transport's own count.
            return int(channel._size(self.queue))
        except Exception as exc:  # noqa: BLE001 - an unreadable depth must not stop relaying
            log.debug("queue depth unavailable: %s", type(exc).__name__)
            self.close()
            return None

    def _redis_depth(self, channel: Any) -> int:
        # Every priority sub-queue counts (a passive declare would raise on an empty Redis
        # queue). kombu's own _size makes a new redis-py client per call; this keeps one.
        if self._redis is None:
            self._redis_keys = [channel._q_for_pri(self.queue, p) for p in channel.priority_steps]
            self._redis = channel._create_client()
        pipe = self._redis.pipeline(transaction=False)
        for key in self._redis_keys:
            pipe.llen(key)
        return sum(pipe.execute())

    def _drop_channel(self) -> None:
        self._redis = None
        channel, self._channel = self._channel, None
        if channel is not None:
            with contextlib.suppress(Exception):
                channel.close()

    def close(self) -> None:
        self._drop_channel()
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                connection.close()
