"""Entry points of the child processes that `pool start` spawns: pollers and the coordinator."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
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
    # Reloads come from the supervisor over the pipe; a hangup of the whole process group
    # (a closed terminal) must not end the children by default.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # The supervisor blocks these while spawning, and a spawned child inherits that mask.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})


def _on_reload(events: Connection, apply: Callable[[dict[str, Any]], None]) -> None:
    """Apply the settings the supervisor sends after a reload, from a thread of its own."""

    def listen() -> None:
        while True:
            try:
                kind, changes = events.recv()
            except (EOFError, OSError):
                return  # the supervisor is gone; the stop signal ends this process
            if kind == "reload":
                if "log_level" in changes:
                    logging.getLogger().setLevel(changes["log_level"])
                apply(changes)
                log.info("reloaded: %s", ", ".join(f"{k}={v}" for k, v in changes.items()))

    threading.Thread(target=listen, name="reload-listener", daemon=True).start()


def worker_slot(index: int) -> str:
    """The name a poller's metric files carry: the same across restarts of that poller."""
    return f"poller-{index}"


def poller_main(settings: Settings, index: int, shard_count: int, events: Connection) -> None:
    """Claim -> publish -> ack until SIGTERM/SIGINT; then finish or release the in-flight batch."""
    # Keep a margin inside the supervisor's timeout for releasing what could not be published.
    stop = StopSignal(grace=max(0.5, settings.shutdown_timeout * 0.8))
    _stop_on_signals(stop)
    setup_logging(settings.log_level, worker_slot(index), settings.log_format,
                  secret_urls=(settings.db_url, settings.broker_url))
    # prometheus_client is first imported here, in the child, after the supervisor set
    # PROMETHEUS_MULTIPROC_DIR; connections are made here too, never inherited.
    from pool.metrics import PrometheusHooks, use_worker_files
    from pool.poller import Poller, PollerIdentity
    from pool.publisher import create_publisher
    from pool.queue_depth import QueueDepth
    from pool.shards import ShardKeeper, host_id
    from pool.store import open_store

    use_worker_files(worker_slot(index))
    store = open_store(settings)
    publisher = create_publisher(settings)
    depth = QueueDepth(settings)
    host = host_id(settings.host_id)
    keeper = ShardKeeper(store, host, worker_slot(index), settings.shard_lease_seconds)
    identity = PollerIdentity(owner=f"{host}:{os.getpid()}:{index}", index=index, shard_count=shard_count)
    poller = Poller(store, publisher, identity, settings, stop, PrometheusHooks(index), depth, shards=keeper)
    # The loop reads poller.settings afresh for every batch: one assignment swaps them.
    _on_reload(events, lambda changes: setattr(poller, "settings", poller.settings.replace(**changes)))
    events.send(("ready", worker_slot(index), os.getpid(), None))
    try:
        poller.run()
    finally:
        poller.close()
        depth.close()
        publisher.close()
        store.close()
    log.info("stopped")


def coordinator_main(settings: Settings, events: Connection) -> None:
    """Serve /metrics aggregated over every poller, health, status and the status page."""
    stop = StopSignal()
    _stop_on_signals(stop)
    setup_logging(settings.log_level, "coordinator", settings.log_format,
                  secret_urls=(settings.db_url, settings.broker_url))
    from pool.coordinator import CoordinatorApp, ask_parent_to_reload, poller_collector, serve
    from pool.queue_depth import QueueDepth
    from pool.status import StatusMonitor
    from pool.store import open_store

    store = open_store(settings, pool_size=1)
    depth = QueueDepth(settings)
    collector = poller_collector()
    monitor = StatusMonitor(settings, store, depth, collector.collect, interval=settings.status_interval)
    pruning = _periodic_prune(settings, store)
    try:
        server = serve(settings.metrics_host, settings.metrics_port,
                       CoordinatorApp(monitor, collector, ask_parent_to_reload))
    except OSError as exc:
        events.send((
            "fatal", "coordinator", os.getpid(),
            f"cannot serve metrics on {settings.metrics_host}:{settings.metrics_port}: {exc.strerror};"
            " set PULSE_METRICS_PORT or --metrics-port",
        ))
        return
    monitor.start()
    if pruning is not None:
        pruning.start()
    _on_reload(events, lambda changes: setattr(monitor, "settings", monitor.settings.replace(**changes)))
    events.send(("ready", "coordinator", os.getpid(), server.server_port))
    stop.wait()
    server.shutdown()
    if pruning is not None:
        pruning.stop()
    monitor.stop()
    depth.close()
    store.close()


PRUNE_EVERY_SECONDS = 600.0
PRUNE_BATCH_ROWS = 5000


def _periodic_prune(settings: Settings, store: Any) -> Any:
    """With PULSE_PRUNE_PROCESSED_AFTER set, the coordinator deletes old processed rows itself."""
    if not settings.prune_processed_after:
        return None
    from pool.durations import describe_age
    from pool.retention import PeriodicPrune, Pruner

    age = settings.prune_processed_after
    return PeriodicPrune(Pruner(store, age, PRUNE_BATCH_ROWS), PRUNE_EVERY_SECONDS, describe_age(age))
