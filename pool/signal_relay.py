"""Act on signals from a thread of their own, never inside a Python signal handler.

A handler runs in the main thread between two bytecodes, possibly while that thread holds a
non-reentrant lock: threading.Event.wait() holds its Condition's Lock around the wait, so a
handler that calls Event.set() can block forever on a lock its own thread holds (seen as a
poller that never stopped on SIGTERM; CPython issue 126434 discusses the class of bug).
Here the handler does nothing; Python's C-level handler writes the signal number to a socket
(signal.set_wakeup_fd), and a daemon thread reads it and calls the callback, where taking locks
and logging are safe.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any

log = logging.getLogger(__name__)


def _ignore(_signum: int, _frame: Any) -> None:
    """Installed so the C handler records the signal; the relay thread does the work."""


def relay_signals(signums: Iterable[int], on_signal: Callable[[int], None]) -> None:
    """Call `on_signal(signum)` from a relay thread for every delivery of one of `signums`.

    Must be called from the main thread (signal.set_wakeup_fd requires it), once per process."""
    wanted = frozenset(signums)
    receiver, sender = socket.socketpair()
    sender.setblocking(False)
    # If the relay falls a socket buffer behind, further numbers are dropped, not blocked on:
    # the C handler must never block. For stop signals the queued ones suffice.
    signal.set_wakeup_fd(sender.fileno(), warn_on_full_buffer=False)
    for signum in wanted:
        signal.signal(signum, _ignore)

    # The thread's arguments keep `sender` open for as long as the process lives.
    def relay(receiver: socket.socket, _sender: socket.socket) -> None:
        while True:
            try:
                data = receiver.recv(64)
            except OSError as exc:  # never seen; but a relay that ends must not end unnoticed
                log.error("signal relay stopped, %s is no longer handled: %s",
                          "/".join(signal.Signals(s).name for s in sorted(wanted)), exc)
                return
            if not data:
                return
            for signum in data:
                if signum in wanted:
                    try:
                        on_signal(signum)
                    except Exception:  # the relay must outlive a failing callback
                        log.exception("handling %s failed", signal.Signals(signum).name)

    threading.Thread(target=relay, args=(receiver, sender), name="signal-relay", daemon=True).start()
