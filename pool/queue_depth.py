"""How many messages wait in the broker queue, for backpressure."""

from __future__ import annotations

import contextlib
import logging

from amqp.exceptions import NotFound

from pool.broker import broker_scheme, create_celery_app
from pool.config import Settings

log = logging.getLogger(__name__)

AMQP_SCHEMES = ("amqp", "amqps", "pyamqp")


class QueueDepth:
    """Reads the depth of `settings.queue`; None when the broker cannot tell right now."""

    def __init__(self, settings: Settings) -> None:
        self.queue = settings.queue
        self.is_amqp = broker_scheme(settings) in AMQP_SCHEMES
        self.app = create_celery_app(settings)
        self._connection = None
        self._channel = None

    def _get_channel(self):
        if self._channel is None:
            if self._connection is None:
                self._connection = self.app.connection_for_read()
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
            # Virtual transports (Redis, filesystem) count every priority sub-queue here; a
            # passive declare would raise on an empty Redis queue.
            return int(channel._size(self.queue))
        except Exception as exc:  # noqa: BLE001 - an unreadable depth must not stop relaying
            log.debug("queue depth unavailable: %s", type(exc).__name__)
            self.close()
            return None

    def _drop_channel(self) -> None:
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
