"""`pool poller --slot K` and `pool coordinator`: one poller, or the coordinator, as a program of its
own, for a process manager such as supervisord that starts, restarts and stops each of them.

They run the same entry points as the children of `pool start` (pool/process_main.py), with the
log in place of the supervisor's pipe. What `pool start` does for its children is done here or by
whoever starts them: the metrics directory comes from PROMETHEUS_MULTIPROC_DIR, and wiping it is
the job of the command that starts the process manager (a poller that wiped it would erase the
others' totals).
"""

from __future__ import annotations

import logging
import os

from pool.config import Settings
from pool.errors import ConfigError
from pool.metrics_dir import check_metrics_dir
from pool.process_main import LogReporter, coordinator_main, poller_main, take_slot, worker_slot

log = logging.getLogger(__name__)

METRICS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"


def metrics_dir(command: str) -> str:
    """The shared multi-process metrics directory, created if missing, or a one-line ConfigError.

    Without it each process would count into its own memory and the coordinator, another process,
    would see none of it."""
    path = os.environ.get(METRICS_DIR_VARIABLE, "")
    if not path:
        raise ConfigError(
            f"{command} needs {METRICS_DIR_VARIABLE}, the directory the pollers and the coordinator "
            "share their metrics through: set it in supervisord's environment (environment=) or "
            "the service's, the same for every poller and the coordinator"
        )
    check_metrics_dir(path)
    return path


def check_slot(slot: int, workers: int) -> None:
    """Poller K of N relays its share of the rows: K must be one of 0 .. N-1."""
    if not 0 <= slot < workers:
        raise ConfigError(
            f"--slot must be between 0 and {workers - 1} (PULSE_WORKERS or --workers is {workers}), "
            f"got {slot}"
        )


def run_poller(settings: Settings, slot: int) -> None:
    """Run poller `slot` of `settings.workers` until SIGTERM/SIGINT, as under `pool start`."""
    metrics_dir("pool poller")
    check_slot(slot, settings.workers)
    # First: a twin still running in this slot must keep its files, and this one must not start.
    claim = take_slot(slot)
    from prometheus_client import multiprocess

    # A predecessor in this slot that was killed left its live gauges behind (pid, heartbeat,
    # paused); nobody reaped it as `pool start` would. The files are named by slot, not pid, so
    # only this slot's are removed; its counters stay and this poller counts on from them.
    multiprocess.mark_process_dead(worker_slot(slot))
    try:
        poller_main(settings, slot, settings.workers, LogReporter(), claim)
    finally:
        # As `pool start` does when it reaps a poller: a stopped poller is no longer shown live.
        multiprocess.mark_process_dead(worker_slot(slot))


def run_coordinator(settings: Settings) -> None:
    """Serve metrics, health and status for the pollers of this host until SIGTERM/SIGINT."""
    metrics_dir("pool coordinator")
    coordinator_main(settings, LogReporter())
    log.info("stopped")
