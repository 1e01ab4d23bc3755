"""Synthetic signals for demos, tests and benchmarks."""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

NAMES = ("temperature", "pressure", "humidity", "vibration", "voltage", "latency", "throughput")
SOURCES = ("sensor", "api", "manual")


def generate_signals(count: int, seed: int | None = None) -> Iterator[dict[str, Any]]:
    rng = random.Random(seed)
    now = datetime.now(UTC)
    for _ in range(count):
        yield {
            "name": rng.choice(NAMES),
            "value": round(rng.gauss(50.0, 40.0), 3),
            "source": rng.choice(SOURCES),
            "timestamp": now - timedelta(seconds=rng.uniform(0, 3600)),
        }
