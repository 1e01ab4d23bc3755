"""How drain time grows with backlog size, and what steady churn leaves behind in PostgreSQL.

    python loadtest/growth.py --sizes 10000,100000,1000000 --workers 8

For each size: a fresh schema prepared by `pool init-db` (partial index, fillfactor and
autovacuum settings), the backlog seeded with COPY, drained into Redis by `pool start`; then the
table's live and dead tuples, its size, and the claim's plan once most rows are processed.
Then the dead tuples once vacuumed: by autovacuum if the server runs it (waiting up to
--vacuum-wait), otherwise by a plain VACUUM, which shows what autovacuum would reclaim.
Prints one line per size.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
import uuid
from urllib.parse import quote

import psycopg
import redis

# Run as a script (python loadtest/growth.py), so its folder is on sys.path.
from harness import POOL, pool_env, start_pool, wait_drained

from pool.store.postgres import SESSION_SETTINGS


def scan_nodes(plan: dict) -> str:
    """The plan's scan nodes, e.g. 'Index Scan using signals_pool_pending'."""
    nodes = []
    if "Scan" in plan["Node Type"]:
        index = plan.get("Index Name")
        nodes.append(plan["Node Type"] + (f" using {index}" if index else ""))
    for child in plan.get("Plans", []):
        nodes.append(scan_nodes(child))
    return ", ".join(n for n in nodes if n)


def drain(size: int, workers: int, pg: str, redis_url: str, vacuum_wait: float) -> dict:
    schema = f"growth_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    db_url = f"{pg}?options={quote(f'-csearch_path={schema}')}"
    broker = redis.Redis.from_url(redis_url)
    broker.flushdb()
    env = pool_env(PULSE_DB_URL=db_url, PULSE_BROKER_URL=redis_url, PULSE_BACKPRESSURE_HIGH="0")
    try:
        subprocess.run([*POOL, "seed", "--count", str(size), "--chunk", "50000"], env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE signals")
        proc = start_pool(env, workers)
        started = time.monotonic()
        with psycopg.connect(db_url, autocommit=True) as conn:
            wait_drained(broker, conn, size)
            seconds = time.monotonic() - started
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
            # What the churn left before any manual vacuum: autovacuum's own work is included.
            live, dead, vacuums = conn.execute(
                "SELECT n_live_tup, n_dead_tup, autovacuum_count FROM pg_stat_user_tables"
                " WHERE relid = 'signals'::regclass").fetchone()
            table_mb = conn.execute("SELECT pg_table_size('signals') / 1048576.0").fetchone()[0]
            pending_index_kb = conn.execute(
                "SELECT pg_relation_size('signals_pool_pending') / 1024.0").fetchone()[0]
            # The plan as a poller's session gets it.
            conn.execute(SESSION_SETTINGS)
            plan = conn.execute(
                "EXPLAIN (FORMAT JSON) SELECT id FROM signals WHERE processed = 0 AND dead_at IS NULL"
                " AND id % 8 = 3 ORDER BY id LIMIT 500").fetchone()[0]
            # Then give autovacuum (60 s naptime by default) its chance, as steady churn would.
            autovacuum_on = conn.execute("SHOW autovacuum").fetchone()[0] == "on"
            deadline = time.monotonic() + (vacuum_wait if autovacuum_on else 0)
            dead_after, vacuums_after = dead, vacuums
            while time.monotonic() < deadline and vacuums_after == vacuums:
                time.sleep(2)
                dead_after, vacuums_after = conn.execute(
                    "SELECT n_dead_tup, autovacuum_count FROM pg_stat_user_tables"
                    " WHERE relid = 'signals'::regclass").fetchone()
            if not autovacuum_on:
                conn.execute("VACUUM signals")
                dead_after = conn.execute("SELECT n_dead_tup FROM pg_stat_user_tables"
                                          " WHERE relid = 'signals'::regclass").fetchone()[0]
        return {"rows": size, "seconds": seconds, "rows_per_s": size / seconds, "live": live,
                "dead": dead, "dead_after": dead_after, "autovacuums": vacuums_after,
                "table_mb": float(table_mb),
                "pending_index_kb": float(pending_index_kb), "claim_scan": scan_nodes(plan[0]["Plan"])}
    finally:
        broker.flushdb()
        with psycopg.connect(pg, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--pg", default="postgresql://root@127.0.0.1:5432/test")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/10")
    parser.add_argument("--vacuum-wait", type=float, default=150.0,
                        help="seconds to wait after the drain for autovacuum to run once")
    args = parser.parse_args()
    with psycopg.connect(args.pg, autocommit=True) as conn:
        if conn.execute("SHOW autovacuum").fetchone()[0] != "on":
            print("note: autovacuum is off on this server; 'dead+vac' is after a plain VACUUM")
    print(f"{'rows':>9} {'drain s':>8} {'rows/s':>8} {'live':>9} {'dead':>8} {'dead+vac':>8} {'autovac':>7}"
          f" {'table MB':>8} {'pending idx KB':>14}  claim plan")
    for size in (int(s) for s in args.sizes.split(",")):
        r = drain(size, args.workers, args.pg, args.redis, args.vacuum_wait)
        print(f"{r['rows']:>9} {r['seconds']:>8.2f} {r['rows_per_s']:>8.0f} {r['live']:>9} {r['dead']:>8}"
              f" {r['dead_after']:>8}"
              f" {r['autovacuums']:>7} {r['table_mb']:>8.1f} {r['pending_index_kb']:>14.0f}"
              f"  {r['claim_scan']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
