"""Celery task messages onto the broker; a row counts as published only once the broker accepted it."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from kombu.exceptions import EncodeError, KombuError, OperationalError

from pool.broker import create_celery_app, with_short_timeouts
from pool.config import Settings
from pool.payload import PayloadError, Prepared, prepare, task_id_for
from pool.redact import redact_text
from pool.store import ClaimedRow

log = logging.getLogger(__name__)

# Every connect, read and write on the publishing connection gives up after this long (waiting
# for RabbitMQ's confirms has its own, longer limit): a broker that stopped answering fails the
# batch, whose rows go back unsent, instead of holding them leased for good.
BROKER_IO_TIMEOUT = 5.0

# Where an error happens says whose it is. Building a row's payload, or serialising it, fails
# for that row alone (rejected: dead at once, it would fail the same way again). On the
# message-at-a-time path, kombu's refusal of one message that is not about the connection is
# that message's (failed: tried again with backoff, up to max_attempts). Anything else raised
# while sending is the broker's, whatever its type - refused or dropped connections, kombu's
# and redis-py's own ConnectionError (not the builtin one), wrong credentials, an unknown
# vhost, an unparsable port, a full disk under the filesystem transport: the rows go back
# unsent, uncharged, and the poller backs off.


@dataclass
class PublishResult:
    accepted: list[int] = field(default_factory=list)
    # row id -> why this row can never be published as it is (its own values): dead at once
    rejected: dict[int, str] = field(default_factory=dict)
    # row id -> why the broker refused this row this time: retried with backoff
    failed: dict[int, str] = field(default_factory=dict)
    # rows not accepted because the broker failed; they are released, not charged an attempt
    unsent: list[int] = field(default_factory=list)
    broker_error: str | None = None


class Publisher:
    """Publishes claimed rows as `settings.task_name` tasks with task id `signal-<id>`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.max_payload_bytes = settings.max_payload_bytes
        self.app = create_celery_app(settings)
        self._producer = None  # with its connection (producer.connection), made on first use

    def _get_producer(self):
        if self._producer is None:
            # Kept before connecting: should that fail, _reset() still has the connection to drop.
            connection = with_short_timeouts(self.app.connection_for_write(), BROKER_IO_TIMEOUT)
            self._producer = self.app.amqp.Producer(connection)
            connection.ensure_connection(max_retries=1)
        return self._producer

    def _reset(self, broken: bool = False) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            # A broken connection may fail to close too; it is being dropped either way. Nor is
            # it asked to close: AMQP's close waits for the broker's replies (for the channel,
            # then the connection), which a RabbitMQ that stopped answering never sends.
            with contextlib.suppress(Exception):
                producer.connection.collect() if broken else producer.connection.close()

    def build_payloads(self, rows: Sequence[ClaimedRow], result: PublishResult) -> list[Prepared]:
        """Every row that can be published, prepared; the others go to rejected."""
        payloads = []
        max_bytes = self.max_payload_bytes
        for row in rows:
            try:
                payloads.append(prepare(row, max_bytes))
            except PayloadError as exc:
                result.rejected[row.id] = str(exc)
            except Exception as exc:  # noqa: BLE001 - one odd row must not take down the batch
                # prepare() reads nothing but the row's values: it would fail the same way again.
                result.rejected[row.id] = self._describe(exc)
        return payloads

    def publish(self, rows: Sequence[ClaimedRow],
                keep_going: Callable[[], bool] = lambda: True) -> PublishResult:
        """Publish rows one by one (send_task); once `keep_going()` is False the rest are unsent."""
        result = PublishResult()
        payloads = self.build_payloads(rows, result)
        for position, (row_id, payload, _json) in enumerate(payloads):
            if not keep_going():
                result.unsent.extend(p.id for p in payloads[position:])
                break
            try:
                self.app.send_task(
                    self.settings.task_name,
                    args=[payload],
                    task_id=task_id_for(row_id),
                    producer=self._get_producer(),
                    # kombu's default would retry a lost broker three more times per row; the
                    # poller's backoff retries the rows instead, and at once here means the
                    # rest of the batch goes back unsent without waiting.
                    retry=False,
                )
            except Exception as exc:  # noqa: BLE001 - see "Where an error happens" above
                if isinstance(exc, EncodeError):
                    result.rejected[row_id] = self._describe(exc)
                    continue
                if isinstance(exc, KombuError) and not isinstance(exc, OperationalError):
                    result.failed[row_id] = self._describe(exc)
                    continue
                result.broker_error = self._describe(exc)
                result.unsent.extend(p.id for p in payloads[position:])
                self._reset(broken=True)
                break
            result.accepted.append(row_id)
        return result

    def _describe(self, exc: BaseException) -> str:
        message = f"{type(exc).__name__}: {exc}".splitlines()[0]
        return redact_text(message, self.settings.broker_url)

    def close(self) -> None:
        self._reset()


class BatchPublisher(Publisher):
    """Publishes a batch in one go; subclasses say how, and which rows the broker accepted."""

    def send_batch(self, payloads: list[Prepared]) -> tuple[set[int], str | None]:
        """Send all payloads; return the accepted row ids and an error about the others."""
        raise NotImplementedError

    def accepted_before_failure(self) -> set[int]:
        """Row ids the broker had surely accepted when the connection failed mid-batch."""
        return set()

    def publish(self, rows: Sequence[ClaimedRow],
                keep_going: Callable[[], bool] = lambda: True) -> PublishResult:
        result = PublishResult()
        if not keep_going():
            result.unsent.extend(r.id for r in rows)
            return result
        payloads = self.build_payloads(rows, result)
        if not payloads:
            return result
        try:
            accepted, result.broker_error = self.send_batch(payloads)
        except Exception as exc:  # noqa: BLE001 - see "Where an error happens" above
            result.broker_error = self._describe(exc)
            accepted = self.accepted_before_failure()
            self._reset(broken=True)
        result.accepted.extend(p.id for p in payloads if p.id in accepted)
        result.unsent.extend(p.id for p in payloads if p.id not in accepted)
        return result


def create_publisher(settings: Settings) -> Publisher:
    """The fastest path the broker allows: one LPUSH per batch on Redis, a batch of publishes and
    then its confirms on RabbitMQ, send_task (one message at a time) on any other transport."""
    from pool.broker import broker_scheme

    scheme = broker_scheme(settings)
    if scheme in ("redis", "rediss"):
        from pool.redis_batch import RedisBatchPublisher

        return RedisBatchPublisher(settings)
    if scheme in ("amqp", "amqps", "pyamqp"):
        from pool.amqp_batch import AmqpBatchPublisher

        return AmqpBatchPublisher(settings)
    return Publisher(settings)
