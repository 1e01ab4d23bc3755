"""`pool start`: spawn N pollers and one coordinator, restart the ones that die, drain on SIGTERM,
reload settings on SIGHUP.

No child's death takes the pool down: one killed from outside (a signal, the OOM killer) is
restarted at once, at any moment including start-up; one that fails by itself before it is ready
is restarted with a capped, doubling delay while the others keep working. Only a configuration
error reported by a child stops `pool start`.

Exit codes: 0 graceful stop, 1 pool start itself failed (its pollers are stopped first),
2 configuration error, 3 stopped at once by a second signal (in-flight batches were abandoned;
their leases expire).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

from pool.config import RELOADABLE, Settings
from pool.errors import ConfigError
from pool.http_address import listen_url
from pool.metrics_dir import reset_metrics_dir
from pool.poller_slot import SlotClaim, SlotTaken, claim_slot, slots_in_use
from pool.process_main import coordinator_main, poller_main, worker_slot

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_CHILD_FAILED = 1
EXIT_CONFIG = 2
EXIT_FORCED = 3

# Children not all ready this long after start are named in a warning (once): a child that
# keeps failing, or services that are down, leave pool start running but not ready.
READY_WARNING_AFTER = 60.0
RESTART_DELAY_CAP = 30.0
# A child that lived at least this long is considered healthy; its restart delay starts over.
HEALTHY_LIFETIME = 10.0
# The slot file `pool start` holds in its metrics folder (beside its pollers' poller-K files).
SUPERVISOR_SLOT = "pool-start"
# Children are forked from a server process that imported these once: a child then costs a fork
# and its own connections, not a fresh interpreter importing celery, kombu and SQLAlchemy (about
# 1 CPU-s each). That server is a fresh interpreter too, started by pool start: it holds no
# thread, connection, socket or logging handler to pass on, and each child builds its own after
# it starts (the random module reseeds itself in a forked child).
CHILD_PRELOAD = [
    "pool.fork_server",  # first: the server's signal mask (see there)
    "celery", "kombu", "sqlalchemy", "psycopg", "redis", "prometheus_client",
    "pool.process_main", "pool.poller", "pool.publisher", "pool.redis_batch", "pool.amqp_batch",
    "pool.queue_depth", "pool.store.postgres", "pool.store.sqlite", "pool.shards",
    "pool.coordinator", "pool.status", "pool.http_server",
]


@dataclass
class Child:
    name: str
    target: Any
    args: tuple
    process: BaseProcess | None = None
    started_at: float = 0.0
    restart_delay: float = 0.0
    restart_at: float | None = None
    ready: bool = False  # reported ready since its last start
    # A pipe of its own per child: a child killed mid-write can only break its own pipe. (A
    # shared multiprocessing.Queue stays locked forever if the writer dies holding its lock.)
    # The child reports on it (ready, fatal); the supervisor sends it reloaded settings.
    events: Connection | None = None


class Supervisor:
    def __init__(self, settings: Settings, load_settings_again: Callable[[], Settings] | None = None) -> None:
        self.settings = settings
        self.load_settings_again = load_settings_again
        self.reload_requested = False
        self.shutdown_timeout = settings.shutdown_timeout
        self.ctx = multiprocessing.get_context("forkserver")
        self.signals_seen = 0
        self.metrics_port: int | None = None
        self.stop_deadline = float("inf")
        self.children: list[Child] = []
        self.config_error = False  # a child reported one: everything stops, exit 2
        self.announced_ready = False  # the "ready:" line, once every child first was ready
        self.started_at = 0.0
        self.warned_not_ready = False

    # --- signals -----------------------------------------------------------------
    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.signals_seen += 1
        if self.signals_seen == 1:
            self.stop_deadline = time.monotonic() + self.shutdown_timeout
            log.info("received %s: draining (send it again to stop at once)", signal.Signals(signum).name)
            for child in self.children:
                self._signal_child(child, signal.SIGTERM)
        else:
            log.warning("second signal: stopping at once")
            for child in self.children:
                self._signal_child(child, signal.SIGKILL)

    def _on_hangup(self, _signum: int, _frame: Any) -> None:
        self.reload_requested = True  # handled by the watch loop, outside the signal handler

    def _reload(self) -> None:
        """Re-read the settings' sources and pass what may change at run time to every child."""
        self.reload_requested = False
        if self.load_settings_again is None:
            return
        try:
            fresh = self.load_settings_again()
        except ConfigError as exc:
            log.error("reload failed, keeping the current settings: %s", exc)
            return
        except Exception as exc:  # noqa: BLE001 - the supervisor's loop must outlive any reload
            log.error("reload failed, keeping the current settings: %s: %s", type(exc).__name__,
                      str(exc).splitlines()[0] if str(exc) else "")
            return
        current = self.settings
        changes = {k: getattr(fresh, k) for k in RELOADABLE if getattr(fresh, k) != getattr(current, k)}
        fixed = [f.name for f in dataclasses.fields(Settings)
                 if f.name not in RELOADABLE and getattr(fresh, f.name) != getattr(current, f.name)]
        if fixed:
            log.warning("reload: %s changed but only take effect when pool start is restarted",
                        ", ".join(fixed))
        if not changes:
            log.info("reload: no reloadable setting changed")
            return
        self.settings = current.replace(**changes)
        if "log_level" in changes:
            logging.getLogger().setLevel(changes["log_level"])
        for child in self.children:
            if child.events is not None and child.process is not None and child.process.exitcode is None:
                with contextlib.suppress(OSError):  # a child dying now is restarted with the new values
                    child.events.send(("reload", changes))
        log.info("reloaded: %s", ", ".join(f"{k} {getattr(current, k)} -> {v}" for k, v in changes.items()))

    @staticmethod
    def _signal_child(child: Child, signum: int) -> None:
        if child.process is not None and child.process.pid and child.process.exitcode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.process.pid, signum)

    @property
    def stopping(self) -> bool:
        return self.signals_seen > 0

    # --- children ----------------------------------------------------------------
    def _start_fork_server(self) -> None:
        # After PROMETHEUS_MULTIPROC_DIR is set: prometheus_client reads it on import.
        from multiprocessing import forkserver

        self.ctx.set_forkserver_preload(CHILD_PRELOAD)
        forkserver.ensure_running()

    def _start(self, child: Child) -> None:
        # Block signals while spawning so a SIGTERM cannot land between start() and bookkeeping.
        if child.events is not None:
            child.events.close()
        ours, theirs = self.ctx.Pipe(duplex=True)
        # A restarted child starts from the settings as last reloaded.
        args = tuple(self.settings if isinstance(a, Settings) else a for a in child.args)
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
        try:
            process = self.ctx.Process(target=child.target, args=(*args, theirs), name=child.name)
            process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
            theirs.close()
        child.events = ours
        log.info("started %s (pid %d)", child.name, process.pid)
        child.process = process
        child.started_at = time.monotonic()
        child.restart_at = None
        child.ready = False

    @staticmethod
    def _receive(readable: list) -> list[tuple]:
        messages = []
        for reader in readable:
            try:
                while reader.poll():
                    messages.append(reader.recv())
            except (EOFError, OSError):
                pass  # the child exited; its sentinel tells the rest
            except Exception as exc:  # noqa: BLE001 - a garbled message must not stop the supervisor
                log.warning("dropped an unreadable message from a child: %s", type(exc).__name__)
        return messages

    def _reap(self, child: Child) -> None:
        process = child.process
        assert process is not None
        process.join()
        code = process.exitcode
        # Its live-gauge files go; its counters stay (and its successor, which writes the same
        # files, counts on from them) so that totals never drop.
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(child.name)
        if self.stopping:
            return
        if code == EXIT_CONFIG:  # it said why on its pipe, read before this
            self.config_error = True
            return
        lived = time.monotonic() - child.started_at
        # Only a child that keeps failing by itself (a non-zero exit) before it is ready is
        # crash-looping and gets a growing delay. One that was working, or that something else
        # killed (a negative code: a signal), is replaced at once.
        if child.ready or lived >= HEALTHY_LIFETIME or code is None or code <= 0:
            child.restart_delay = 0.0
        log.warning("%s (pid %d) exited with code %s after %.1f s; restarting in %.1f s",
                    child.name, process.pid, code, lived, child.restart_delay)
        child.restart_at = time.monotonic() + child.restart_delay
        child.restart_delay = min(max(child.restart_delay * 2, 0.5), RESTART_DELAY_CAP)

    def _on_ready(self, name: str, pid: int, detail: Any) -> None:
        for child in self.children:
            if child.name == name:
                child.ready = True
        if name == "coordinator":
            self.metrics_port = detail
        if self.announced_ready:
            log.info("%s (pid %d) ready again", name, pid)
        elif all(c.ready for c in self.children):
            self.announced_ready = True
            log.info("ready: %d pollers, metrics on %s/metrics", self.settings.workers,
                     listen_url(self.settings.metrics_host, self.metrics_port))

    def _drain_events(self) -> None:
        readers = [c.events for c in self.children if c.events is not None]
        for kind, name, pid, detail in self._receive(wait(readers, timeout=0)):
            if kind == "ready":
                self._on_ready(name, pid, detail)
            elif kind == "reload":  # POST /-/reload on the coordinator
                self.reload_requested = True
            elif kind == "fatal":  # a configuration error: restarting would fail the same way
                log.error("%s: %s", name, detail)
                self.config_error = True
            else:
                log.error("%s: %s", name, detail)

    def _warn_if_not_ready(self) -> None:
        if self.announced_ready or self.warned_not_ready or self.stopping:
            return
        if time.monotonic() - self.started_at >= READY_WARNING_AFTER:
            self.warned_not_ready = True
            waiting = [c.name for c in self.children if not c.ready]
            log.warning("not ready %.0f s after start: waiting for %s", READY_WARNING_AFTER,
                        ", ".join(waiting))

    def _stop_all(self, deadline: float) -> bool:
        """SIGTERM everyone, wait until `deadline`; returns True if all stopped in time."""
        for child in self.children:
            self._signal_child(child, signal.SIGTERM)
        for child in self.children:
            if child.process is not None:
                child.process.join(max(0.0, deadline - time.monotonic()))
        late = [c for c in self.children if c.process is not None and c.process.exitcode is None]
        for child in late:
            log.warning("%s did not stop within the shutdown timeout; killing it", child.name)
            self._signal_child(child, signal.SIGKILL)
            child.process.join()
        return not late

    # --- main ----------------------------------------------------------------------
    @contextlib.contextmanager
    def prepared(self) -> Iterator[None]:
        """Hold the metrics folder and start the fork server, for the length of the block.

        `pool start` enters it before checking the database and the broker, so that the fork
        server imports pool's libraries while those checks run, not after them."""
        owned_dir = None
        metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if not metrics_dir:
            metrics_dir = owned_dir = tempfile.mkdtemp(prefix="pool-metrics-")
        try:
            hold = hold_metrics_dir(metrics_dir)
        except ConfigError:
            if owned_dir:
                shutil.rmtree(owned_dir, ignore_errors=True)
            raise
        try:
            reset_metrics_dir(metrics_dir)
            # Children inherit the fork server's environment; prometheus_client reads this on
            # import, in the server.
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
            self._start_fork_server()
            yield
        finally:
            hold.close()
            if owned_dir:
                shutil.rmtree(owned_dir, ignore_errors=True)

    def run(self) -> int:
        """Start the children and watch them until stopped; call it inside `prepared()`."""
        settings = self.settings
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        signal.signal(signal.SIGHUP, self._on_hangup)

        self.children.append(Child("coordinator", coordinator_main, (settings,)))
        for index in range(settings.workers):
            self.children.append(
                Child(worker_slot(index), poller_main, (settings, index, settings.workers))
            )
        try:
            self.started_at = time.monotonic()
            for child in self.children:
                self._start(child)
            self._watch_until_stopped()
            if self.config_error:
                self._stop_all(time.monotonic() + self.shutdown_timeout)
                return EXIT_CONFIG
            clean = self._stop_all(self.stop_deadline)
            if self.signals_seen > 1:
                return EXIT_FORCED
            log.info("stopped")
            return EXIT_OK if clean else EXIT_FORCED
        except Exception as exc:
            # Whatever went wrong here, no poller may go on relaying with nobody to stop or
            # restart it: they drain and stop as on SIGTERM.
            log.error("pool start failed, stopping the pollers: %s: %s", type(exc).__name__, exc)
            self._stop_all(time.monotonic() + self.shutdown_timeout)
            return EXIT_CHILD_FAILED

    def _watch_until_stopped(self) -> None:
        while True:
            self._watch_step()
            if self.config_error:
                return
            if self.stopping:
                alive = [c for c in self.children if c.process is not None and c.process.exitcode is None]
                if not alive or time.monotonic() >= self.stop_deadline:
                    return

    def _watch_step(self) -> None:
        alive = [c for c in self.children if c.process is not None and c.process.exitcode is None]
        readers = [c.events for c in alive if c.events is not None]
        wait([c.process.sentinel for c in alive] + readers, timeout=0.5)
        # Messages first: a child that reports a configuration error and exits is not restarted.
        self._drain_events()
        if self.config_error:
            return
        if self.reload_requested and not self.stopping:  # SIGHUP, or asked over a pipe
            self._reload()
        self._warn_if_not_ready()
        now = time.monotonic()
        for child in self.children:
            process = child.process
            if process is not None and process.exitcode is not None and child.restart_at is None:
                self._reap(child)
                if self.config_error:
                    return
                if self.stopping:
                    child.process = None
            elif child.restart_at is not None and now >= child.restart_at and not self.stopping:
                self._start(child)


def hold_metrics_dir(path: str) -> SlotClaim:
    """Make `path` this pool start's own for its life, or a one-line ConfigError: emptying a folder
    that other pollers write to would erase their totals, and ours would write into their files."""
    try:
        os.makedirs(path, exist_ok=True)
        hold = claim_slot(path, SUPERVISOR_SLOT)
    except SlotTaken as exc:
        raise ConfigError(f"PROMETHEUS_MULTIPROC_DIR: {exc}; give each pool start its own folder") from None
    except OSError as exc:
        raise ConfigError(f"PROMETHEUS_MULTIPROC_DIR {path}: {exc.strerror}") from None
    hold.record(SUPERVISOR_SLOT)
    busy = [slot for slot in slots_in_use(path) if not slot.startswith(SUPERVISOR_SLOT + " ")]
    if busy:
        hold.close()
        raise ConfigError(f"PROMETHEUS_MULTIPROC_DIR {path} is in use by running pollers"
                          f" ({', '.join(busy)}): give each pool start its own folder")
    return hold


def run_supervisor(settings: Settings, load_settings_again: Callable[[], Settings] | None = None) -> int:
    supervisor = Supervisor(settings, load_settings_again)
    with supervisor.prepared():
        return supervisor.run()
