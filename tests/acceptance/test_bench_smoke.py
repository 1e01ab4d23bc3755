"""`python loadtest/bench.py --quick` runs end to end and writes its table, CSV and chart.

It checks only that the run works. It does not assert timings: they depend on the machine.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PG_BASE, require_service
from tests.helpers import clean_env

ROOT = Path(__file__).resolve().parents[2]


def require_matplotlib() -> None:
    if importlib.util.find_spec("matplotlib") is not None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail("matplotlib is not installed (CI=true): pip install -e '.[test]'")
    pytest.skip("matplotlib is not installed: pip install -e '.[load]' to run the benchmark")


def test_quick_bench_prints_table_and_writes_csv_and_chart(tmp_path, redis_url):
    require_matplotlib()
    # The benchmark creates and drops schemas of its own under PG_BASE.
    require_service("PostgreSQL", "127.0.0.1", 5432)
    out = tmp_path / "results"
    run = subprocess.run(
        [sys.executable, "loadtest/bench.py", "--quick", "--out", str(out), "--pg", PG_BASE,
         "--redis", redis_url],
        cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=600,
    )
    report = f"stdout:\n{run.stdout}\nstderr:\n{run.stderr[-4000:]}"
    assert run.returncode == 0, report

    for workers in (1, 2):
        row = rf"^pool start\s+{workers}\s+5,000\s+[\d.]+\s+[\d,]+\s.*\bok$"
        assert re.search(row, run.stdout, re.M), report
    for row in ("seed-style loop", "database-only (claim+ack)", "broker-only (RedisBatchPublisher)",
                "broker-only (LPUSH prebuilt)"):
        assert re.search(rf"^{re.escape(row)}\s+\d+\s.*\bok$", run.stdout, re.M), report
    assert re.search(r"^ratio pool\(2 workers\) ÷ seed-style: [\d.]+×", run.stdout, re.M), report
    assert re.search(r"^ratio pool\(2 workers\) ÷ database-only: [\d.]+×", run.stdout, re.M), report
    assert "FAIL" not in run.stdout, report

    csv_path, png_path = out / "bench.csv", out / "bench.png"
    assert csv_path.is_file(), report
    assert png_path.is_file() and png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", report
    lines = csv_path.read_text().splitlines()
    assert lines[0].startswith("what,workers,rows,seconds,rows_per_s,"), lines[0]
    assert sum(line.startswith("pool start,") for line in lines) == 2, lines
