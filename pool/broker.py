"""Celery apps built from Settings: one for publishing (no result backend), one for the worker."""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

from pool.config import Settings
from pool.errors import ConfigError


def broker_scheme(settings: Settings) -> str:
    return settings.broker_url.split("://", 1)[0].lower()


def _transport_options(settings: Settings) -> dict[str, Any]:
    scheme = broker_scheme(settings)
    if scheme == "filesystem":
        folder = os.path.abspath(settings.broker_folder)
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"PULSE_BROKER_FOLDER: cannot use {folder!r}: {exc.strerror}") from None
        # One folder for in and out, so producers and consumers in other processes meet.
        return {"data_folder_in": folder, "data_folder_out": folder, "control_folder": folder}
    if scheme in ("redis", "rediss"):
        # A Redis that accepts TCP but never answers would block a publish for minutes.
        return {"socket_timeout": 5, "socket_connect_timeout": 5, "max_retries": 1}
    if scheme in ("amqp", "amqps", "pyamqp"):
        # A publish counts only once RabbitMQ confirmed it.
        return {"confirm_publish": True, "max_retries": 1}
    return {}


def create_celery_app(settings: Settings, name: str = "pool") -> Celery:
    app = Celery(name, broker=settings.broker_url, set_as_current=False)
    if broker_scheme(settings) == "filesystem":
        app.conf.broker_transport = "pool.fs_transport:Transport"
    app.conf.update(
        broker_transport_options=_transport_options(settings),
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=5,
        task_serializer="json",
        accept_content=["json"],
        result_backend=None,
        task_ignore_result=True,
        task_default_queue=settings.queue,
        worker_hijack_root_logger=False,
    )
    return app


def with_short_timeouts(connection: Any, seconds: float) -> Any:
    """A clone of a kombu connection whose connect, and every read and write on its socket, give
    up after `seconds`: for calls that must not wait out a broker that went silent."""
    if connection.transport.driver_type in ("filesystem", "memory"):
        # No socket to time out; and kombu's clone() warns about the hostname they have not.
        return connection
    return connection.clone(
        connect_timeout=seconds,
        transport_options={
            **connection.transport_options,
            # redis-py's names
            "socket_timeout": seconds, "socket_connect_timeout": seconds,
            # py-amqp's: without them every AMQP reply (a queue declare, a channel open, a close)
            # is waited for forever, and a RabbitMQ that stopped answering hangs the caller.
            "read_timeout": seconds, "write_timeout": seconds,
        },
    )
