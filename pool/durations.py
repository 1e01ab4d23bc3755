"""Ages as commands take them (90s, 30m, 12h, 7d, 2w), shared so that every command reads them alike."""

from __future__ import annotations

import math

AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
# About a hundred years: any retention a user means, and well inside what both databases' date
# arithmetic and Python's timedelta hold (SQLite's dates end at year 0000, its now - 300,000,000
# weeks is NULL; PostgreSQL's is "timestamp out of range").
MAX_AGE_SECONDS = 36500 * 86400


def parse_age(text: str) -> float:
    """'90s', '30m', '12h', '7d', '2w' -> seconds; ValueError with a one-line message otherwise."""
    text = text.strip().lower()
    try:
        number, unit = float(text[:-1]), AGE_UNITS[text[-1]]
    except (ValueError, KeyError, IndexError):
        raise ValueError(f"{text!r} is not an age like 30m, 12h or 7d") from None
    # float() also reads 'nan' and 'inf'; no row is older than either, so they are mistakes.
    if not math.isfinite(number):
        raise ValueError(f"{text!r} is not an age like 30m, 12h or 7d")
    if number < 0:
        raise ValueError("an age cannot be negative")
    if number * unit > MAX_AGE_SECONDS:
        raise ValueError(f"{text!r} is too long an age; at most {describe_age(MAX_AGE_SECONDS)}")
    return number * unit


def describe_age(seconds: float) -> str:
    """The shortest exact form parse_age reads back: 3600 -> '1h', 90 -> '90s'."""
    for unit, size in sorted(AGE_UNITS.items(), key=lambda item: -item[1]):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"
