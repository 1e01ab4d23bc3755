"""`pool prune` as a user runs it: old processed rows go in batches, everything else stays."""

from __future__ import annotations

import psycopg
import pytest

from tests.helpers import clean_env, run_pool


def seed_rows(pg_url: str) -> dict[str, list[int]]:
    """Rows of each kind, timed on the database clock; returns kind -> ids."""
    kinds = {
        # kind: (age in seconds, processed, dead)
        "old processed": (2 * 3600, 1, False),
        "recent processed": (600, 1, False),
        "old unprocessed": (2 * 3600, 0, False),
        "old dead": (2 * 3600, 0, True),
    }
    ids: dict[str, list[int]] = {}
    with psycopg.connect(pg_url, autocommit=True) as conn:
        for kind, (age, processed, dead) in kinds.items():
            count = 7 if kind == "old processed" else 2
            ids[kind] = [conn.execute(
                "INSERT INTO signals (name, value, source, timestamp, processed, dead_at)"
                " VALUES ('n', 1.0, 's', now() - make_interval(secs => %s), %s,"
                " CASE WHEN %s THEN now() ELSE NULL END) RETURNING id",
                (age, processed, dead),
            ).fetchone()[0] for _ in range(count)]
    return ids


def remaining_ids(pg_url: str) -> set[int]:
    with psycopg.connect(pg_url) as conn:
        return {r[0] for r in conn.execute("SELECT id FROM signals")}


def test_prune_deletes_old_processed_rows_and_prints_one_summary_line(pg_url, tmp_path):
    env = clean_env(PULSE_DB_URL=pg_url)
    assert run_pool("init-db", env=env, cwd=tmp_path).returncode == 0
    ids = seed_rows(pg_url)

    result = run_pool("prune", "--processed-older-than", "1h", "--batch-size", "3", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["pruned 7 processed rows older than 1h from signals"]
    assert "pruning processed rows" in result.stderr and "Traceback" not in result.stderr
    kept = {i for kind, kind_ids in ids.items() if kind != "old processed" for i in kind_ids}
    assert remaining_ids(pg_url) == kept

    again = run_pool("prune", "--processed-older-than", "1h", env=env, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == "pruned 0 processed rows older than 1h from signals"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--processed-older-than", "soon"], "--processed-older-than"),
        (["--processed-older-than", "-1d"], "negative"),
        (["--processed-older-than", "1h", "--batch-size", "0"], "--batch-size"),
        (["--processed-older-than", "1h", "--batch-size", "many"], "--batch-size"),
    ],
)
def test_bad_input_exits_2_with_one_error_line_and_deletes_nothing(pg_url, tmp_path, args, needle):
    env = clean_env(PULSE_DB_URL=pg_url)
    assert run_pool("init-db", env=env, cwd=tmp_path).returncode == 0
    ids = seed_rows(pg_url)
    result = run_pool("prune", *args, env=env, cwd=tmp_path)
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pool: error:") and needle in lines[0], result.stderr
    assert result.stdout == ""
    assert remaining_ids(pg_url) == {i for kind_ids in ids.values() for i in kind_ids}


def test_prune_on_an_unprepared_table_says_run_init_db(pg_url, tmp_path):
    result = run_pool("prune", "--processed-older-than", "7d", env=clean_env(PULSE_DB_URL=pg_url),
                      cwd=tmp_path)
    assert result.returncode == 2
    assert "init-db" in result.stderr and len(result.stderr.splitlines()) == 1
