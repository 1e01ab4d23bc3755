"""The chaos suite, shortened: kills, a Redis stop and a PostgreSQL restart lose no signal."""

from __future__ import annotations

import io

import pytest

from loadtest.chaos import ChaosConfig, run_chaos
from tests.conftest import require_service


# It restarts the machine's PostgreSQL: every other test would see the restart.
@pytest.mark.exclusive
def test_short_chaos_run_loses_nothing():
    require_service("PostgreSQL", "127.0.0.1", 5432)
    out = io.StringIO()
    report = run_chaos(
        ChaosConfig(rows=4000, workers=4, batch_size=100, redis_stop_at=2.0, redis_stop_for=3.0,
                    pg_restart_at=7.0, insert_seconds=10.0, timeout=240),
        out=out,
    )
    print(out.getvalue() + "\n".join(report.lines()))
    assert report.ok, report.problems
    assert report.kills >= 3
    assert report.redis_recovery is not None and report.pg_recovery is not None
    assert report.processed_good == report.good and report.dead_poison == report.poison
