"""Retry delays: exponential, capped, with jitter so failed rows do not retry in lockstep."""

from __future__ import annotations

import random


def retry_delay(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Seconds before try number `attempt + 1`, for attempt >= 1.

    "Equal jitter": half the capped exponential is fixed and half random, so a delay never
    collapses to zero yet retries of many rows spread out."""
    exponential = min(cap, base * 2 ** min(attempt - 1, 60))
    return exponential / 2 + (rng or random).uniform(0, exponential / 2)
