"""pytest plugin for scripts/mutation.sh: a test that outlives its limit ends the run as a timeout.

A mutant can turn a wait into a wait forever (a loop whose exit never comes, an event never set).
mutmut's own limit scales with the summed durations of every test that covers the mutated
function, which for the poller loop is many minutes; here each test gets a fixed limit instead.
The process exits with 36, the code mutmut records as "timeout" (counted as killed, but reported
apart, so that a hang is not mistaken for a failing assertion). Loaded only with
`-p tests.mutation_timeout`; the limit is POOL_MUTATION_TEST_TIMEOUT seconds (default 120).
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator

import pytest

MUTMUT_TIMEOUT_EXIT = 36


def _limit() -> float:
    return float(os.environ.get("POOL_MUTATION_TEST_TIMEOUT", "120"))


def _expire(nodeid: str) -> None:
    sys.__stderr__.write(f"\nmutation_timeout: {nodeid} ran past {_limit():g} s: counted as a timeout\n")
    sys.__stderr__.flush()
    os._exit(MUTMUT_TIMEOUT_EXIT)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    timer = threading.Timer(_limit(), _expire, args=(item.nodeid,))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
