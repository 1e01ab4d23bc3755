"""Entry points of the child processes that `pool start` forks: pollers and the coordinator.

The same entry points run on their own under a process manager (`pool poller`, `pool coordinator`,
see pool/standalone.py); a Reporter hides whether a supervisor's pipe is there to report to."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, Protocol

from pool.config import Settings
from pool.errors import ConfigError
from pool.logs import setup_logging
from pool.poller import StopSignal
from pool.poller_slot import SlotClaim, SlotTaken, claim_slot, current_member
from pool.signal_relay import relay_signals

log = logging.getLogger(__name__)


def _stop_on_signals(stop: StopSignal) -> None:
    def _stop(signum: int) -> None:
        if stop.is_set():
            return
        log.info("received %s: finishing the in-flight batch", signal.Signals(signum).name)
        stop.request()

    relay_signals((signal.SIGTERM, signal.SIGINT), _stop)
    # Reloads come from the supervisor over the pipe; a hangup of the whole process group
    # (a closed terminal) must not end the children by default.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # Blocked in the fork server, whose mask every child of pool start inherits (SIGTERM and
    # SIGINT stay blocked: the relay takes them; pool/fork_server.py).
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})


def _on_reload(events: Connection, apply: Callable[[dict[str, Any]], None],
               parent_gone: Callable[[], None]) -> None:
    """Apply the settings the supervisor sends after a reload, from a thread of its own; call
    `parent_gone` if the supervisor's end of the pipe closes."""

    def listen() -> None:
        while True:
            try:
                kind, changes = events.recv()
            except (EOFError, OSError):
                # The supervisor is gone (killed, say): drain and stop as on its SIGTERM, rather
                # than relay on as an orphan nobody will stop or restart.
                log.warning("pool start is gone; stopping")
                parent_gone()
                return
            if kind != "reload":
                continue
            try:
                if "log_level" in changes:
                    logging.getLogger().setLevel(changes["log_level"])
                apply(changes)
            except Exception as exc:  # noqa: BLE001 - this thread must outlive a bad reload
                log.error("reload failed, keeping the current settings: %s: %s", type(exc).__name__, exc)
                continue
            log.info("reloaded: %s", ", ".join(f"{k}={v}" for k, v in changes.items()))

    threading.Thread(target=listen, name="reload-listener", daemon=True).start()


class Reporter(Protocol):
    """Whom a poller or the coordinator tells that it is ready or cannot start, and hears reloads from."""

    # True when a parent supervisor (`pool start`) reloads settings and can be asked to.
    supervised: bool

    def ready(self, name: str, detail: Any = None, summary: str | None = None) -> None: ...

    def fatal(self, name: str, message: str) -> None: ...

    def ask_reload(self) -> None: ...

    def on_reload(self, apply: Callable[[dict[str, Any]], None],
                  parent_gone: Callable[[], None] = lambda: None) -> None: ...


class PipeReporter:
    """Under `pool start`: events go over this child's pipe to the supervisor, reloads come back on it."""

    supervised = True

    def __init__(self, events: Connection) -> None:
        self.events = events

    def ready(self, name: str, detail: Any = None, summary: str | None = None) -> None:
        self.events.send(("ready", name, os.getpid(), detail))

    def fatal(self, name: str, message: str) -> None:
        self.events.send(("fatal", name, os.getpid(), message))

    def ask_reload(self) -> None:
        """Ask `pool start` to reload its settings (as its SIGHUP does). Over the pipe, not by a
        signal to the parent: a child's parent is the fork server, not pool start."""
        self.events.send(("reload", "coordinator", os.getpid(), None))

    def on_reload(self, apply: Callable[[dict[str, Any]], None],
                  parent_gone: Callable[[], None] = lambda: None) -> None:
        _on_reload(self.events, apply, parent_gone)


class LogReporter:
    """Run on its own (supervisord, systemd, a shell): the log is the only listener.

    A process manager restarts the program to change settings, so there are no reloads; a fatal
    start-up problem becomes the command's one-line error and exit 2."""

    supervised = False

    def ready(self, name: str, detail: Any = None, summary: str | None = None) -> None:
        log.info("ready: %s", summary or f"{name} (pid {os.getpid()})")

    def fatal(self, name: str, message: str) -> None:
        raise ConfigError(message)

    def ask_reload(self) -> None:
        """Never called (supervised is False): a process manager restarts the program instead."""

    def on_reload(self, apply: Callable[[dict[str, Any]], None],
                  parent_gone: Callable[[], None] = lambda: None) -> None:
        """Nothing sends reloads to a process started on its own."""


def as_reporter(events: Connection | Reporter) -> Reporter:
    """`pool start` hands its children a bare pipe; the standalone commands hand a Reporter."""
    return events if isinstance(events, PipeReporter | LogReporter) else PipeReporter(events)


def worker_slot(index: int) -> str:
    """The name a poller's metric files carry: the same across restarts of that poller."""
    return f"poller-{index}"


def take_slot(index: int) -> SlotClaim:
    """Hold poller slot `index` in the metrics folder for this process's life, or a ConfigError:
    a live twin in this slot writes the same metric files."""
    folder = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    try:
        return claim_slot(folder, worker_slot(index))
    except SlotTaken as exc:
        raise ConfigError(f"{exc}: give each poller its own --slot, and each pool start its own"
                          " PROMETHEUS_MULTIPROC_DIR") from None
    except OSError as exc:
        raise ConfigError(f"PROMETHEUS_MULTIPROC_DIR {folder}: {exc.strerror}") from None


def poller_main(settings: Settings, index: int, shard_count: int, events: Connection | Reporter,
                slot_claim: SlotClaim | None = None) -> None:
    """Claim -> publish -> ack until SIGTERM/SIGINT; then finish or release the in-flight batch.

    `slot_claim`: the slot already taken by the caller (see take_slot); else it is taken here."""
    reporter = as_reporter(events)
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

    slot = worker_slot(index)
    claim = slot_claim
    try:
        if claim is None:
            claim = take_slot(index)  # before its metric files are touched
        use_worker_files(slot)
        store = open_store(settings)
        publisher = create_publisher(settings)
        depth = QueueDepth(settings)
    except ConfigError as exc:  # one line to the supervisor (exit 2), not a traceback per restart
        reporter.fatal(slot, str(exc))
        raise SystemExit(2) from None  # a failure to start, not a clean exit to restart at once
    keeper = ShardKeeper(store, host_id(settings.host_id), slot, settings.shard_lease_seconds,
                         replaces=claim.predecessor)
    claim.record(keeper.member)
    # Row leases carry the member name too: unique per process, and it says whose lease it is.
    identity = PollerIdentity(owner=keeper.member, index=index, shard_count=shard_count)
    poller = Poller(store, publisher, identity, settings, stop, PrometheusHooks(index), depth, shards=keeper)
    # The loop reads poller.settings afresh for every batch: one assignment swaps them.
    reporter.on_reload(lambda changes: setattr(poller, "settings", poller.settings.replace(**changes)),
                       parent_gone=stop.request)
    reporter.ready(worker_slot(index))
    try:
        poller.run()
    finally:
        poller.close()
        depth.close()
        publisher.close()
        store.close()
        claim.close()
    log.info("stopped")


def coordinator_main(settings: Settings, events: Connection | Reporter) -> None:
    """Serve /metrics aggregated over every poller, health, status and the status page."""
    reporter = as_reporter(events)
    stop = StopSignal()
    _stop_on_signals(stop)
    setup_logging(settings.log_level, "coordinator", settings.log_format,
                  secret_urls=(settings.db_url, settings.broker_url))
    from pool.coordinator import CoordinatorApp, guard_for, poller_collector
    from pool.http_address import listen_url, url_host
    from pool.http_server import BoundedWSGIServer
    from pool.queue_depth import QueueDepth
    from pool.status import StatusMonitor
    from pool.store import open_store

    try:
        store = open_store(settings, pool_size=1)
        depth = QueueDepth(settings)
    except ConfigError as exc:
        reporter.fatal("coordinator", str(exc))
        return
    collector = poller_collector()
    folder = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    monitor = StatusMonitor(settings, store, depth, collector.collect, interval=settings.status_interval,
                            slot_member=lambda slot: current_member(folder, slot))
    pruning = _periodic_prune(settings, store)
    app = CoordinatorApp(monitor, collector, reporter.ask_reload if reporter.supervised else None)
    try:
        server = BoundedWSGIServer(settings.metrics_host, settings.metrics_port, app, settings.http_timeout)
    except OSError as exc:
        reporter.fatal(
            "coordinator",
            f"cannot serve metrics on {url_host(settings.metrics_host)}:{settings.metrics_port}: "
            f"{exc.strerror}; set PULSE_METRICS_HOST / PULSE_METRICS_PORT or --metrics-host / --metrics-port",
        )
        return
    # The rules depend on the address bound (a name may resolve to loopback or not), and hold
    # from the first request on.
    app.guard = guard_for(settings, server.server_address[0])
    server.start()
    if app.guard.changes_refused:
        log.warning("listening beyond loopback (%s) without PULSE_HTTP_TOKEN: POST /-/reload is refused; "
                    "set PULSE_HTTP_TOKEN to allow it", settings.metrics_host)
    monitor.start()
    if pruning is not None:
        pruning.start()
    reporter.on_reload(lambda changes: setattr(monitor, "settings", monitor.settings.replace(**changes)),
                       parent_gone=stop.request)
    reporter.ready("coordinator", server.server_port,
                   f"coordinator, metrics on {listen_url(settings.metrics_host, server.server_port)}/metrics")
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
