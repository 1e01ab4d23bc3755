"""One connection to the broker at start-up, to tell a broker that can never work as configured
(exit 2, one line) from one that is merely down right now (the pollers retry until it is up)."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile

from pool.broker import broker_scheme, create_celery_app, with_short_timeouts
from pool.config import Settings
from pool.errors import ConfigError
from pool.redact import redact_text, redact_url

log = logging.getLogger(__name__)


CHECK_TIMEOUT = 1.0  # seconds per try of the start-up check


def is_configuration_error(exc: BaseException) -> bool:
    """Whether no retry can fix this: a URL the transport cannot read, wrong credentials, an
    unknown vhost or Redis database number. Refusals, timeouts and resets are not."""
    import amqp.exceptions
    import redis.exceptions

    for error in _chain(exc):
        if isinstance(error, redis.exceptions.AuthenticationError | redis.exceptions.ResponseError):
            return True  # WRONGPASS, NOAUTH, NOPERM, "DB index is out of range"
        if isinstance(error, amqp.exceptions.IrrecoverableConnectionError
                      | amqp.exceptions.IrrecoverableChannelError):
            return True  # ACCESS_REFUSED (403), NOT_ALLOWED (530: no such vhost), ...
        if isinstance(error, ValueError | TypeError | KeyError | ImportError):
            return True  # the URL could not be used at all
    return False


def _chain(exc: BaseException) -> list[BaseException]:
    """The error and what caused it: kombu wraps a transport's errors in its own."""
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def describe(exc: BaseException, settings: Settings) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return redact_text(f"{type(exc).__name__}: {text}" if text else type(exc).__name__, settings.broker_url)


def check_broker(settings: Settings) -> str | None:
    """Connect once. Raises ConfigError when the broker cannot work as configured; returns a
    one-line reason when it is unreachable now (not a configuration error), None when it answered."""
    if broker_scheme(settings) == "filesystem":
        _check_folder(settings.broker_folder)
        return None
    where = f"broker {redact_url(settings.broker_url)}"
    try:
        # A broker that accepts TCP but never answers held start-up for the transport's whole
        # retry budget (12 s on Redis); short tries tell a refusal from silence, and silence is
        # only a warning.
        connection = with_short_timeouts(create_celery_app(settings).connection_for_write(), CHECK_TIMEOUT)
    except Exception as exc:  # noqa: BLE001 - classified below
        raise ConfigError(f"{where}: {describe(exc, settings)}") from None
    try:
        connection.connect()
    except Exception as exc:  # noqa: BLE001 - classified here
        if is_configuration_error(exc):
            raise ConfigError(f"{where}: {describe(exc, settings)}") from None
        return describe(exc, settings)
    finally:
        with contextlib.suppress(Exception):  # a broken connection may fail to close too
            connection.release()
    return None


def _check_folder(folder: str) -> None:
    """The filesystem transport's folder: created if missing, and writable."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise ConfigError(f"PULSE_BROKER_FOLDER: cannot use {os.path.abspath(folder)!r}: {reason}") from None


def warn_if_unreachable(settings: Settings) -> None:
    """`check_broker`, with an unreachable broker logged: it is an outage, not a configuration error."""
    problem = check_broker(settings)
    if problem:
        log.warning("broker %s unreachable at start; the pollers retry until it answers: %s",
                    redact_url(settings.broker_url), problem)
