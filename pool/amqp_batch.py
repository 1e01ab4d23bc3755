"""RabbitMQ: publish a whole batch, then wait once for all its publisher confirms.

With kombu's `confirm_publish`, every message waits for its own confirm: one round trip per
row. Here Celery and kombu build each message as usual, the channel's publish is captured,
the batch is sent back to back, and the broker's (possibly multiple) acks are collected. A
row counts as accepted only once its confirm arrived; a nack or a timeout leaves the rows
that were not confirmed unsent.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from pool.config import Settings
from pool.payload import Prepared, task_id_for
from pool.publisher import BatchPublisher

CONFIRM_TIMEOUT = 10.0


class AmqpBatchPublisher(BatchPublisher):
    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self._captured: list[tuple[Any, dict[str, Any]]] = []  # kombu's basic_publish calls
        # Confirm-mode delivery tags count publishes on a channel from 1: set with each channel.
        self._next_tag: int
        self._outstanding: dict[int, int] = {}  # delivery tag -> row id
        self._confirmed: set[int] = set()  # row ids
        self._nacked: set[int] = set()

    def _get_producer(self):
        if self._producer is None:
            producer = super()._get_producer()
            channel = producer.channel
            self._next_tag = 1
            self._outstanding.clear()

            def capture(message: Any, **publish_kwargs: Any) -> None:
                self._captured.append((message, publish_kwargs))

            def settle(into: set[int]) -> Callable[[int, bool], None]:
                def handler(delivery_tag: int, multiple: bool) -> None:
                    tags = [t for t in self._outstanding if t <= delivery_tag] if multiple else [delivery_tag]
                    for tag in tags:
                        row_id = self._outstanding.pop(tag, None)
                        if row_id is not None:
                            into.add(row_id)
                return handler

            channel.confirm_select()
            channel.events["basic_ack"].add(settle(self._confirmed))
            channel.events["basic_nack"].add(settle(self._nacked))
            # An instance attribute shadows the method: kombu builds the message, we send it.
            channel.basic_publish = capture
        return self._producer

    def accepted_before_failure(self) -> set[int]:
        return set(self._confirmed)

    def send_batch(self, payloads: list[Prepared]) -> tuple[set[int], str | None]:
        amqp = self.app.amqp
        name = self.settings.task_name
        producer = self._get_producer()
        channel = producer.channel
        self._captured.clear()
        self._confirmed.clear()
        self._nacked.clear()
        batch = []
        for row_id, payload, _json in payloads:
            message = amqp.create_task_message(task_id_for(row_id), name, [payload],
                                               reply_to=self.app.thread_oid, ignore_result=None)
            # No retry: on a lost broker kombu would reconnect and publish on a new channel,
            # one without the capture, waiting for each confirm on its own.
            amqp.send_task_message(producer, name, message, retry=False)
            batch.append((row_id, *self._captured.pop()))  # exactly one publish per message
        for row_id, message, publish_kwargs in batch:
            # Not the confirm-mode publish kombu would call: that one waits for each confirm.
            channel._basic_publish(message, **publish_kwargs)
            self._outstanding[self._next_tag] = row_id
            self._next_tag += 1
        self._wait_for_confirms(producer.connection)
        error = f"RabbitMQ nacked {len(self._nacked)} message(s)" if self._nacked else None
        return set(self._confirmed), error

    def _wait_for_confirms(self, connection: Any) -> None:
        until = time.monotonic() + CONFIRM_TIMEOUT
        while self._outstanding:
            remaining = until - time.monotonic()
            try:
                if remaining <= 0:
                    raise TimeoutError
                connection.drain_events(timeout=remaining)
            except TimeoutError:  # socket.timeout too: RabbitMQ sent nothing in the time left
                raise TimeoutError(f"no publisher confirm for {len(self._outstanding)} message(s)") from None
