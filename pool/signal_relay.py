"""Act on signals from a thread of their own, never inside a Python signal handler.

A handler runs in the main thread between two bytecodes, possibly while that thread holds a
non-reentrant lock: threading.Event.wait() holds its Condition's Lock around the wait, so a
handler that calls Event.set() can block forever on a lock its own thread holds (seen as a
poller that never stopped on SIGTERM; CPython issue 126434 discusses the class of bug).

Here the signals are blocked in the calling thread, and so in every thread started after it
(threads inherit the mask), and a relay thread takes them with sigwait() and calls the callback,
where taking locks and logging are safe. The kernel keeps a blocked signal pending until the
relay takes it, so none is lost: an earlier version had the C handler write each signal to a
socket (signal.set_wakeup_fd), whose writes are dropped once a burst of signals fills it, and a
SIGTERM after such a burst never stopped the process.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterable

log = logging.getLogger(__name__)


def relay_signals(signums: Iterable[int], on_signal: Callable[[int], None]) -> None:
    """Call `on_signal(signum)` from a relay thread for each delivery of one of `signums`
    (deliveries of one signal while the relay is busy merge into one call, as the kernel
    merges pending signals).

    Call it from the main thread before any other thread starts: a thread started earlier keeps
    the signals unblocked, and one delivered to it would take its default action."""
    wanted = frozenset(signums)
    signal.pthread_sigmask(signal.SIG_BLOCK, wanted)

    def relay() -> None:
        while True:
            signum = signal.sigwait(wanted)
            try:
                on_signal(signum)
            except Exception:  # the relay must outlive a failing callback
                log.exception("handling %s failed", signal.Signals(signum).name)

    threading.Thread(target=relay, name="signal-relay", daemon=True).start()
