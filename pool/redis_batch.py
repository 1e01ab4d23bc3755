"""Redis: a whole batch onto the broker in one LPUSH, each message exactly as Celery writes it.

Celery's own `send_task` does one Redis round trip per message (and takes a pooled client for
each). Here Celery and kombu still build every message - same headers, properties, body and
encoding - but kombu's final `_put` is captured instead of sent, and the batch goes out as one
LPUSH per (priority) list. One command is atomic: the broker takes all of it or none of it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

from kombu.utils.json import dumps

from pool.payload import task_id_for
from pool.publisher import CONNECTION_ERRORS, Publisher, PublishResult
from pool.store import ClaimedRow


class RedisBatchPublisher(Publisher):
    def _get_producer(self):
        if self._producer is None:
            producer = super()._get_producer()
            channel = producer.channel
            self._captured: list[tuple[str, str]] = []

            def capture(queue: str, message: dict[str, Any], **_kwargs: Any) -> None:
                priority = channel._get_message_priority(message, reverse=False)
                self._captured.append((channel._q_for_pri(queue, priority), dumps(message)))

            # An instance attribute shadows the method: kombu builds the message, we send it.
            channel._put = capture
        return self._producer

    def publish(self, rows: Sequence[ClaimedRow],
                keep_going: Callable[[], bool] = lambda: True) -> PublishResult:
        result = PublishResult()
        if not keep_going():
            result.unsent.extend(r.id for r in rows)
            return result
        payloads = self.build_payloads(rows, result)
        if not payloads:
            return result
        amqp = self.app.amqp
        name = self.settings.task_name
        try:
            producer = self._get_producer()
            self._captured.clear()
            for row_id, payload in payloads:
                task_id = task_id_for(row_id)
                message = amqp.create_task_message(task_id, name, [payload], {},
                                                   reply_to=self.app.thread_oid, ignore_result=None)
                amqp.send_task_message(producer, name, message, queue=self.settings.queue, retry=False)
            by_list: dict[str, list[str]] = defaultdict(list)
            for key, encoded in self._captured:
                by_list[key].append(encoded)
            with producer.channel.conn_or_acquire() as client:
                for key, encoded in by_list.items():
                    client.lpush(key, *encoded)
        except CONNECTION_ERRORS as exc:
            result.broker_error = self._describe(exc)
            result.unsent.extend(row_id for row_id, _ in payloads)
            self._reset()
            return result
        result.accepted.extend(row_id for row_id, _ in payloads)
        return result
