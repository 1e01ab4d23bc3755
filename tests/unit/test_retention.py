"""Pruner: batch after batch until one comes up short, progress per batch, stoppable between batches."""

from __future__ import annotations

import pytest

from pool.durations import parse_age
from pool.retention import Pruner


class FakeStore:
    """Hands out the scripted batch counts and records each call."""

    def __init__(self, *counts: int) -> None:
        self.counts = list(counts)
        self.calls: list[tuple[float, int]] = []

    def prune_processed(self, older_than_seconds: float, batch_rows: int) -> int:
        self.calls.append((older_than_seconds, batch_rows))
        return self.counts.pop(0)


def test_runs_until_a_batch_comes_up_short_and_reports_every_batch() -> None:
    store = FakeStore(5, 5, 2, 5)
    seen: list[int] = []
    assert Pruner(store, 60.0, 5).run(progress=seen.append) == 12
    assert seen == [5, 5, 2]
    assert store.calls == [(60.0, 5)] * 3


def test_an_empty_first_batch_ends_the_run() -> None:
    store = FakeStore(0)
    assert Pruner(store, 0.0, 100).run() == 0
    assert len(store.calls) == 1


def test_should_stop_is_asked_before_each_batch() -> None:
    store = FakeStore(5, 5, 5, 5)
    seen: list[int] = []
    assert Pruner(store, 1.0, 5).run(progress=seen.append, should_stop=lambda: len(seen) == 2) == 10
    assert seen == [5, 5]
    assert Pruner(FakeStore(), 1.0, 5).run(should_stop=lambda: True) == 0


@pytest.mark.parametrize("batch_rows", [0, -1])
def test_a_batch_that_could_never_come_up_short_is_refused(batch_rows: int) -> None:
    with pytest.raises(ValueError, match="batch_rows"):
        Pruner(FakeStore(), 1.0, batch_rows)


@pytest.mark.parametrize(("text", "seconds"), [
    ("90s", 90), ("30m", 1800), ("12h", 43200), ("7d", 604800), ("2w", 1209600), (" 1.5H ", 5400), ("0s", 0),
])
def test_parse_age_reads_the_short_forms(text: str, seconds: float) -> None:
    assert parse_age(text) == seconds


@pytest.mark.parametrize("text", ["", "7", "d", "soon", "7y", "nand", "infh", "-1d"])
def test_parse_age_refuses_anything_else_in_one_line(text: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_age(text)
    assert "\n" not in str(caught.value)


# --- the coordinator's periodic run ---------------------------------------------------


def test_periodic_prune_runs_at_once_then_waits_and_survives_a_failure(caplog) -> None:
    import logging
    import threading

    from pool.retention import PeriodicPrune

    calls: list[int] = []
    second_run = threading.Event()

    class FlakyStore:
        def prune_processed(self, older_than_seconds: float, batch_rows: int) -> int:
            calls.append(batch_rows)
            if len(calls) == 1:
                return 3  # a short batch: the first run ends here
            if len(calls) == 2:
                raise OSError("database went away")
            second_run.set()
            return 0

    periodic = PeriodicPrune(Pruner(FlakyStore(), 3600, 10), every=0.01, describe_age="1h")
    with caplog.at_level(logging.INFO, logger="pool.retention"):
        periodic.start()
        assert second_run.wait(10), "the run after a failure never came"
        periodic.stop()
    assert "pruned 3 processed rows older than 1h" in caplog.messages
    assert any("pruning failed" in m and "database went away" in m for m in caplog.messages)


@pytest.mark.parametrize(("seconds", "text"), [(3600, "1h"), (90, "90s"), (604800, "1w"), (172800, "2d"),
                                               (5400, "90m"), (1.5, "1.5s")])
def test_describe_age_is_the_shortest_exact_form(seconds: float, text: str) -> None:
    from pool.durations import describe_age, parse_age

    assert describe_age(seconds) == text
    assert parse_age(text) == seconds
