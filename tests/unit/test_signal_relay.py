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


@pytest.mark.skipif(not hasattr(signal, "sigwait"), reason="needs POSIX signals")
def test_sigterm_stops_a_busy_waiter_after_a_burst_of_signals():
    child = subprocess.Popen([sys.executable, "-c", BUSY_WAITER], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        for _ in range(5000):
            os.kill(child.pid, signal.SIGUSR1)
        os.kill(child.pid, signal.SIGTERM)
        out, _ = child.communicate(timeout=30)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == 0
    assert out.strip() == "stopped True ['signal-relay']"


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
def test_sigterm_whose_wakeup_byte_found_the_socket_full_still_stops_the_process():
    child = subprocess.Popen([sys.executable, "-c", SLOW_RELAY], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        os.kill(child.pid, signal.SIGUSR1)
        for _ in range(5000):  # a few hundred fill the socket; the rest, SIGTERM's byte too, are dropped
            os.kill(child.pid, signal.SIGUSR1)
        os.kill(child.pid, signal.SIGTERM)
        out, _ = child.communicate(timeout=15)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == 0
    assert out.strip() == "stopped"
