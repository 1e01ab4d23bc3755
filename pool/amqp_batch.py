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

from pool.payload import Prepared, task_id_for
from pool.publisher import BatchPublisher

CONFIRM_TIMEOUT = 10.0


class AmqpBatchPublisher(BatchPublisher):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._captured: list[tuple[Any, str, str, bool, bool]] = []
        self._next_tag = 1  # confirm-mode delivery tags count publishes on a channel from 1
        self._outstanding: dict[int, int] = {}  # delivery tag -> row id
        self._confirmed: set[int] = set()  # row ids
        self._nacked: set[int] = set()

    def _get_producer(self):
        if self._producer is None:
            producer = super()._get_producer()
            channel = producer.channel
            self._next_tag = 1
            self._outstanding.clear()

            def capture(message: Any, exchange: str = "", routing_key: str = "", mandatory: bool = False,
                        immediate: bool = False, **_kwargs: Any) -> None:
                self._captured.append((message, exchange, routing_key, mandatory, immediate))

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
        for row_id, payload, _json in payloads:
            message = amqp.create_task_message(task_id_for(row_id), name, [payload], {},
                                               reply_to=self.app.thread_oid, ignore_result=None)
            amqp.send_task_message(producer, name, message, queue=self.settings.queue, retry=False)
        for (message, exchange, routing_key, mandatory, immediate), row_id in zip(
            self._captured, (p.id for p in payloads), strict=True
        ):
            channel._basic_publish(message, exchange, routing_key, mandatory, immediate)
            self._outstanding[self._next_tag] = row_id
            self._next_tag += 1
        self._wait_for_confirms()
        error = f"RabbitMQ nacked {len(self._nacked)} message(s)" if self._nacked else None
        return set(self._confirmed), error

    def _wait_for_confirms(self) -> None:
        connection = self._connection
        assert connection is not None
        until = time.monotonic() + CONFIRM_TIMEOUT
        while self._outstanding:
            remaining = until - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no publisher confirm for {len(self._outstanding)} message(s)")
            connection.drain_events(timeout=remaining)
