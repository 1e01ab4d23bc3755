"""Signals reach their callbacks from a thread of their own: a poller busy waiting on an Event
always stops on SIGTERM.

A signal handler that set the Event itself could land while the main thread held the Event's
lock and wait on it forever (a poller that ignored SIGTERM until killed)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

# Waits on an Event in a tight loop, so most signals land while the main thread holds its lock.
BUSY_WAITER = textwrap.dedent("""
    import signal, sys, threading
    from pool.poller import StopSignal
    from pool.signal_relay import relay_signals

    stop = StopSignal()
    nudges = threading.Event()
    threads = set()
    seen = {"nudges": 0}

    def on_signal(signum):
        threads.add(threading.current_thread().name)
        if signum == signal.SIGUSR1:
            seen["nudges"] += 1
            nudges.set()
        else:
            stop.request()

    relay_signals((signal.SIGUSR1, signal.SIGTERM), on_signal)
    print("ready", flush=True)
    while not stop.is_set():
        nudges.wait(0.00001)
        nudges.clear()
    print("stopped", seen["nudges"] > 0, sorted(threads), flush=True)
""")


def burst_then_sigterm(script: str) -> tuple[int, str]:
    """Run `script` until it says ready, send it 5,000 SIGUSR1 and one SIGTERM: its exit code and
    output."""
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        for _ in range(5000):
            os.kill(child.pid, signal.SIGUSR1)
        os.kill(child.pid, signal.SIGTERM)
        out, _ = child.communicate(timeout=30)
    finally:
        child.kill()
        child.wait()
    return child.returncode, out.strip()


@pytest.mark.skipif(not hasattr(signal, "sigwait"), reason="needs POSIX signals")
def test_sigterm_stops_a_busy_waiter_after_a_burst_of_signals():
    assert burst_then_sigterm(BUSY_WAITER) == (0, "stopped True ['signal-relay']")


SLOW_RELAY = textwrap.dedent("""
import signal, sys, threading, time
from pool.poller import StopSignal
from pool.signal_relay import relay_signals

stop = StopSignal()
first = threading.Event()

def on_signal(signum):
    if signum == signal.SIGUSR1 and not first.is_set():
        first.set()
        time.sleep(1.0)  # the relay falls behind while the burst fills its socket
    elif signum == signal.SIGTERM:
        stop.request()

relay_signals((signal.SIGUSR1, signal.SIGTERM), on_signal)
print("ready", flush=True)
stop.wait()
print("stopped", flush=True)
""")


@pytest.mark.skipif(not hasattr(signal, "sigwait"), reason="needs POSIX signals")
def test_sigterm_after_a_burst_that_outran_a_slow_relay_still_stops_the_process():
    # The first SIGUSR1 keeps the relay busy for a second while the rest of the burst arrives:
    # with a wake-up socket, a few hundred signals filled it and SIGTERM's byte was dropped.
    assert burst_then_sigterm(SLOW_RELAY) == (0, "stopped")
