"""Drain a PostgreSQL backlog into Redis with `pool start` and print what it took.

    python loadtest/drain.py --rows 100000 --workers 8

Uses a fresh schema and a Redis database of its own, checks every row processed and every
task id `signal-<id>` on the broker exactly once, then removes both.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from urllib.parse import quote

import psycopg
import redis

# Run as a script (python loadtest/drain.py), so its folder is on sys.path.
from harness import POOL, pool_env, start_pool, wait_drained


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--pg", default="postgresql://root@127.0.0.1:5432/test")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/14")
    args = parser.parse_args()

    schema = f"drain_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(args.pg, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    db_url = f"{args.pg}?options={quote(f'-csearch_path={schema}')}"
    broker = redis.Redis.from_url(args.redis)
    broker.flushdb()
    env = pool_env(PULSE_DB_URL=db_url, PULSE_BROKER_URL=args.redis, PULSE_BATCH_SIZE=str(args.batch_size),
                   PULSE_LOG_LEVEL="WARNING")
    try:
        subprocess.run([*POOL, "seed", "--count", str(args.rows), "--chunk", "20000"], env=env,
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        launched = time.monotonic()
        env["PULSE_LOG_LEVEL"] = "INFO"
        proc = start_pool(env, args.workers)
        ready_at = time.monotonic()
        with psycopg.connect(db_url, autocommit=True) as conn:
            wait_drained(broker, conn, args.rows)
            processed = conn.execute("SELECT COUNT(*) FROM signals WHERE processed = 1").fetchone()[0]
        drained_at = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        exit_code = proc.wait(timeout=120)

        ids: Counter[str] = Counter()
        length = broker.llen("celery")
        for start in range(0, length, 10_000):
            for raw in broker.lrange("celery", start, start + 9_999):
                ids[json.loads(raw)["headers"]["id"]] += 1
        expected = {f"signal-{i}" for i in range(1, args.rows + 1)}
        drain = drained_at - ready_at
        print(f"rows                    {args.rows}")
        print(f"workers                 {args.workers}")
        print(f"startup (launch->ready) {ready_at - launched:.2f} s")
        print(f"drain (ready->all done) {drain:.2f} s")
        print(f"throughput              {args.rows / drain:,.0f} rows/s")
        print(f"rows processed          {processed}")
        print(f"messages on broker      {length}")
        print(f"distinct task ids       {len(ids)} (all expected: {set(ids) == expected})")
        print(f"duplicated task ids     {sum(1 for n in ids.values() if n > 1)}")
        print(f"pool start exit code    {exit_code}")
        ok = processed == args.rows and set(ids) == expected and max(ids.values()) == 1 and exit_code == 0
        print("RESULT", "ok" if ok else "FAILED")
        return 0 if ok else 1
    finally:
        broker.flushdb()
        with psycopg.connect(args.pg, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


if __name__ == "__main__":
    sys.exit(main())
