"""pool start's supervisor (pool/supervisor.py) with stand-ins for its children, scripted to fail.

    python -m tests.supervised_children SCRIPT.json [--shutdown-timeout S] [--restart-delay-cap S]

runs the real Supervisor with one poller and a coordinator, both tiny processes that import
nothing heavy, so that restarts take a fraction of a second. SCRIPT.json lists what the poller
does at each of its starts, in order:

    "ready, then fail"  report ready, then exit 1 by itself
    "fail"              exit 1 by itself before it is ready
    "killed"            be killed by a signal (SIGKILL) before it is ready
    "config error"      report a configuration error and exit 2, as a poller with bad settings
    "serve"             report ready and stop on SIGTERM, as a poller does
    "hang"              report ready and never stop on SIGTERM (a poller stuck in a batch)

The coordinator stand-in reports ready and stops on SIGTERM. The supervisor logs to stderr, in
pool's text format; its exit code is this program's.

Only the standard library is imported at the top: every child imports this module again.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from multiprocessing.connection import Connection
from typing import Any

SCRIPT_VARIABLE = "POOL_TEST_POLLER_SCRIPT"


def _next_step() -> str:
    """Take the poller's next step from the script: one poller process runs at a time."""
    path = os.environ[SCRIPT_VARIABLE]
    with open(path, encoding="utf-8") as file:
        steps = json.load(file)
    step = steps.pop(0) if steps else "serve"
    with open(path, "w", encoding="utf-8") as file:
        json.dump(steps, file)
    return step


def _ready(events: Connection, name: str, detail: Any = None) -> None:
    # What pool.process_main.PipeReporter sends (importing it would cost each child seconds).
    events.send(("ready", name, os.getpid(), detail))


def _until_sigterm() -> None:
    # Children start with SIGTERM blocked (the fork server's mask), as pool's own children expect.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    signal.sigwait({signal.SIGTERM})


def scripted_poller(_settings: Any, index: int, _shard_count: int, events: Connection) -> None:
    name = f"poller-{index}"
    step = _next_step()
    if step == "fail":
        sys.exit(1)
    if step == "killed":
        os.kill(os.getpid(), signal.SIGKILL)
    if step == "config error":
        events.send(("fatal", name, os.getpid(), "PULSE_EXAMPLE is not a valid setting"))
        sys.exit(2)
    _ready(events, name)
    if step == "ready, then fail":
        sys.exit(1)
    if step == "hang":
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        while True:
            time.sleep(60)
    _until_sigterm()


def idle_coordinator(_settings: Any, events: Connection) -> None:
    _ready(events, "coordinator", 0)
    _until_sigterm()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("script")
    parser.add_argument("--shutdown-timeout", type=float, default=5.0)
    parser.add_argument("--restart-delay-cap", type=float)
    args = parser.parse_args()

    import pool.supervisor as supervisor
    from pool.config import load_settings
    from pool.logs import setup_logging

    os.environ[SCRIPT_VARIABLE] = os.path.abspath(args.script)
    supervisor.poller_main = scripted_poller
    supervisor.coordinator_main = idle_coordinator
    if args.restart_delay_cap is not None:  # the real cap (30 s) is reached only after a minute
        supervisor.RESTART_DELAY_CAP = args.restart_delay_cap
    settings = load_settings(environ={}, overrides={"workers": 1, "shutdown_timeout": args.shutdown_timeout})
    setup_logging("INFO", "pool")
    return supervisor.run_supervisor(settings)


if __name__ == "__main__":
    sys.exit(main())
