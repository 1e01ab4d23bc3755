"""Entry points of the child processes that `pool start` spawns: pollers and the coordinator."""

from __future__ import annotations

import logging
import os
import signal
import socket
from multiprocessing.connection import Connection
from typing import Any

from pool.config import Settings
from pool.logs import setup_logging
from pool.poller import StopSignal

log = logging.getLogger(__name__)


def _stop_on_signals(stop: StopSignal) -> None:
    def _handler(signum: int, _frame: Any) -> None:
        if stop.is_set():
            return
        log.info("received %s: finishing the in-flight batch", signal.Signals(signum).name)
        stop.request()

    signal.signal(signal.SIGTERM, _handler)
    signal.signal(signal.SIGINT, _handler)
    # The supervisor blocks these while spawning, and a spawned child inherits that mask.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})


def poller_main(settings: Settings, index: int, shard_count: int, events: Connection) -> None:
    """Claim -> publish -> ack until SIGTERM/SIGINT; then finish or release the in-flight batch."""
    # Keep a margin inside the supervisor's timeout for releasing what could not be published.
    stop = StopSignal(grace=max(0.5, settings.shutdown_timeout * 0.8))
    _stop_on_signals(stop)
    setup_logging(settings.log_level, f"poller-{index}", settings.log_format,
                  secret_urls=(settings.db_url, settings.broker_url))
    # prometheus_client is first imported here, in the child, after the supervisor set
    # PROMETHEUS_MULTIPROC_DIR; connections are made here too, never inherited.
    from pool.metrics import PrometheusHooks
    from pool.poller import Poller, PollerIdentity
    from pool.publisher import create_publisher
    from pool.queue_depth import QueueDepth
    from pool.store import open_store

    store = open_store(settings)
    publisher = create_publisher(settings)
    depth = QueueDepth(settings)
    identity = PollerIdentity(
        owner=f"{socket.gethostname()}:{os.getpid()}:{index}", index=index, shard_count=shard_count
    )
    poller = Poller(store, publisher, identity, settings, stop, PrometheusHooks(index), depth)
    events.send(("ready", f"poller-{index}", os.getpid(), None))
    try:
        poller.run()
    finally:
        poller.close()
        depth.close()
        publisher.close()
        store.close()
    log.info("stopped")


def coordinator_main(settings: Settings, events: Connection) -> None:
    """Serve /metrics aggregated over every poller process until told to stop."""
    stop = StopSignal()
    _stop_on_signals(stop)
    setup_logging(settings.log_level, "coordinator", settings.log_format,
                  secret_urls=(settings.db_url, settings.broker_url))
    from pool.coordinator import serve_metrics

    try:
        server = serve_metrics(settings.metrics_host, settings.metrics_port)
    except OSError as exc:
        events.send((
            "fatal", "coordinator", os.getpid(),
            f"cannot serve metrics on {settings.metrics_host}:{settings.metrics_port}: {exc.strerror};"
            " set PULSE_METRICS_PORT or --metrics-port",
        ))
        return
    events.send(("ready", "coordinator", os.getpid(), server.server_port))
    stop.wait()
    server.shutdown()
