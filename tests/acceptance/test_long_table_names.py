"""Two tables whose names share their first 50 characters, one pool each: before, they shared one
set of shard and member tables (and the second got no indexes), the two pools split the shards
between them and half of each table's rows were never relayed."""

from __future__ import annotations

import signal

import pytest
from sqlalchemy import create_engine, inspect, text

from tests.helpers import (
    PoolProcess,
    clean_env,
    filesystem_messages,
    redis_messages,
    run_pool,
    wait_until,
)

PREFIX = "sensor_readings_from_the_north_sea_platform_array_"  # 50 characters
TABLES = (PREFIX + "alpha", PREFIX + "bravo")
ROWS = 200


@pytest.fixture(params=["postgresql", "sqlite"])
def backend(request, tmp_path) -> dict:
    """Per table: the environment of its pool and how to read what it relayed."""
    if request.param == "postgresql":
        db_url = request.getfixturevalue("pg_url")
        redis_url = request.getfixturevalue("redis_url")
        queue = request.getfixturevalue("queue_name")
        envs = {t: clean_env(PULSE_DB_URL=db_url, PULSE_DB_TABLE=t, PULSE_BROKER_URL=redis_url,
                             PULSE_QUEUE=f"{queue}_{t[-5:]}") for t in TABLES}
        read = {t: (lambda q=envs[t]["PULSE_QUEUE"]: redis_messages(redis_url, q)) for t in TABLES}
    else:
        db_url = request.getfixturevalue("sqlite_url")
        envs = {t: clean_env(PULSE_DB_URL=db_url, PULSE_DB_TABLE=t,
                             PULSE_BROKER_FOLDER=str(tmp_path / f"broker_{t[-5:]}")) for t in TABLES}
        read = {t: (lambda f=tmp_path / f"broker_{t[-5:]}": filesystem_messages(f)) for t in TABLES}
    return {"db_url": db_url, "envs": envs, "read": read}


def pending(db_url: str, table: str) -> int:
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            return conn.execute(text(f'SELECT COUNT(*) FROM "{table}" WHERE processed = 0')).scalar_one()
    finally:
        engine.dispose()


def test_two_long_named_tables_get_their_own_shards_and_every_row_is_relayed(backend, tmp_path):
    db_url, envs = backend["db_url"], backend["envs"]
    for table in TABLES:
        prepared = run_pool("init-db", env=envs[table], cwd=tmp_path)
        assert prepared.returncode == 0, prepared.stderr
        assert "created index" in prepared.stdout  # the second table gets its own indexes too
    engine = create_engine(db_url)
    try:
        for table in TABLES:
            assert len(inspect(engine).get_indexes(table)) == 2, table
    finally:
        engine.dispose()

    # Each pool on a host of its own, as two deployments would be.
    pools = [PoolProcess("start", "--workers", "2", "--metrics-port", "0", "--host-id", f"host-{t[-5:]}",
                         env=envs[t], cwd=tmp_path)
             for t in TABLES]
    try:
        for pool in pools:
            pool.wait_for_line(r"ready: 2 pollers")
            for poller in ("poller-0", "poller-1"):
                pool.wait_for_line(rf"{poller} pool.shards: holding")
        # Rows arrive while both pools run, as they would in production.
        for table in TABLES:
            seeded = run_pool("seed", "--count", str(ROWS), env=envs[table], cwd=tmp_path)
            assert seeded.returncode == 0, seeded.stderr
        for table in TABLES:
            wait_until(lambda t=table: pending(db_url, t) == 0, timeout=60, interval=0.3,
                       message=f"every row of {table} relayed")
        for pool in pools:
            pool.signal(signal.SIGTERM)
            assert pool.wait(timeout=60) == 0, pool.output()
    finally:
        for pool in pools:
            pool.kill()
    for table in TABLES:
        ids = sorted(m["id"] for m in backend["read"][table]())
        assert ids == sorted(f"signal-{i}" for i in range(1, ROWS + 1)), table
