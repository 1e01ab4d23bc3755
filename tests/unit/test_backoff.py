"""retry_delay: exponential per attempt, capped, with "equal jitter" so failed rows spread out."""

from __future__ import annotations

import math
import random

import pytest

from pool.backoff import retry_delay


class FixedRng(random.Random):
    """Jitter pinned to one end of its range."""

    def __init__(self, at_upper: bool) -> None:
        super().__init__(0)
        self.at_upper = at_upper

    def uniform(self, a: float, b: float) -> float:
        return b if self.at_upper else a


HIGHEST, LOWEST = FixedRng(at_upper=True), FixedRng(at_upper=False)


def test_first_retry_waits_about_base_seconds() -> None:
    assert retry_delay(1, 1.0, 300.0, HIGHEST) == 1.0
    assert retry_delay(1, 1.0, 300.0, LOWEST) == 0.5


def test_delay_doubles_with_each_attempt() -> None:
    assert [retry_delay(a, 1.0, 300.0, HIGHEST) for a in range(1, 8)] == [1, 2, 4, 8, 16, 32, 64]
    assert [retry_delay(a, 1.0, 300.0, LOWEST) for a in range(1, 8)] == [0.5, 1, 2, 4, 8, 16, 32]


def test_delay_is_capped() -> None:
    assert [retry_delay(a, 1.0, 300.0, HIGHEST) for a in (9, 10, 20, 50)] == [256, 300, 300, 300]
    assert retry_delay(50, 1.0, 300.0, LOWEST) == 150


def test_base_scales_the_delay() -> None:
    assert retry_delay(3, 2.5, 300.0, HIGHEST) == 10.0


def test_cap_equal_to_base_gives_a_constant_ceiling() -> None:
    assert {retry_delay(a, 5.0, 5.0, HIGHEST) for a in range(1, 30)} == {5.0}


@pytest.mark.parametrize("attempt", [1, 2, 5, 9, 10, 100])
def test_jitter_stays_between_half_and_all_of_the_capped_exponential(attempt: int) -> None:
    rng = random.Random(attempt)
    exponential = min(300.0, 1.0 * 2 ** (attempt - 1))
    delays = [retry_delay(attempt, 1.0, 300.0, rng) for _ in range(500)]
    assert all(exponential / 2 <= d <= exponential for d in delays)


def test_jitter_spreads_rows_that_failed_together() -> None:
    rng = random.Random(1)
    delays = [retry_delay(10, 1.0, 300.0, rng) for _ in range(100)]
    assert len(set(delays)) > 90  # not in lockstep
    assert max(delays) - min(delays) > 60  # over a good part of the [150, 300] window


def test_default_rng_is_used_when_none_is_given() -> None:
    delays = {retry_delay(4, 1.0, 300.0) for _ in range(50)}
    assert all(4.0 <= d <= 8.0 for d in delays)
    assert len(delays) > 1


@pytest.mark.parametrize("base", [0.001, 1.0, 86400.0])
def test_delay_is_never_zero(base: float) -> None:
    for attempt in (1, 2, 1000):
        assert retry_delay(attempt, base, max(base, 300.0), LOWEST) > 0


@pytest.mark.parametrize("attempt", [61, 62, 1000, 10**6, 10**18, 2**200])
def test_huge_attempt_numbers_do_not_overflow(attempt: int) -> None:
    for rng in (HIGHEST, LOWEST, random.Random(attempt)):
        delay = retry_delay(attempt, 86400.0, 86400.0, rng)
        assert math.isfinite(delay)
        assert 43200.0 <= delay <= 86400.0
    assert retry_delay(attempt, 0.001, 300.0, HIGHEST) == 300.0
