"""Row-level fuzz: a seed-shaped table holding every kind of value its column types can hold,
relayed by `pool start`. Every row ends relayed exactly as `send_task` would have sent it, or
dead with its own error, within a bound a single lease expiry would blow; no good row waits on
a bad one; the coordinator, /readyz and `pool status` keep working throughout.

Each column gets each odd value in a row of its own, next to good rows that share its batches
(batches of 10). The expected outcome of a row is what pool.payload makes of it, read as the
claim reads it; values whose fate is plain (NaN, `infinity`, NULL names) are also pinned here.
"""

from __future__ import annotations

import json
import socket
import sqlite3
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
import redis
from sqlalchemy import text

from pool.payload import PayloadError, prepare
from pool.publisher import Publisher
from pool.store import ClaimedRow, create_db_engine, open_store
from pool.store.pg_loaders import register_tolerant_loaders
from tests.helpers import PoolProcess, clean_env, comparable, make_settings, run_pool, wait_until

WORKERS = 2
BATCH = 10
LEASE = 60  # a good row that waited for a bad batch-mate's lease to expire would blow DRAIN_BOUND
DRAIN_BOUND = 30
GOOD_PER_ODD = 2  # good rows after each odd one, so that odd rows share their batches

# An odd value: SQL for it, and whether it must be relayed (True), must die (False), or is
# left to pool.payload to judge (None). NULL is judged per column: see NULL_RELAYED.
Odd = tuple[str, bool | None]
NULL_RELAYED = {"name": False, "value": False, "source": True, "timestamp": True}

PG_TEXT: list[Odd] = [
    ("NULL", None), ("''", True), ("' '", True), ("'ünïcødé ☃ 😀 e\u0301'", True),
    ("E'tab\\there\\nnew \\\\ back \\x01\\x7f'", True), ("'quote '' and \"double\"'", True),
    ("'100% %(body)s %s {id}'", True), ("repeat('é', 100)", True),
]
PG_LONG_TEXT: list[Odd] = [("repeat('x', 70000)", False)]  # over the 64 KiB payload limit
PG_DOUBLE: list[Odd] = [
    ("NULL", None), ("0", True), ("'-0'", True), ("1.7976931348623157e308", True),
    ("-1.7976931348623157e308", True), ("4.9e-324", True), ("'NaN'", False), ("'Infinity'", False),
    ("'-Infinity'", False),
]
PG_NUMERIC: list[Odd] = [
    ("NULL", None), ("0", True), ("0.1", True), ("'-123456789012345678901234567890.123456789'", True),
    ("'1e-400'", True), ("'1e308'", True), ("repeat('9', 400)::numeric", False), ("'NaN'", False),
    ("'Infinity'", False), ("'-Infinity'", False),
]
PG_TIMESTAMPTZ: list[Odd] = [
    ("NULL", None), ("'infinity'", False), ("'-infinity'", False), ("'9999-12-31 23:59:59.999999+00'", True),
    ("'0001-01-01 00:00:00+00'", True), ("'10000-01-01 00:00:00+00'", False),
    ("'0001-01-01 00:00:00+00 BC'", False), ("'294276-12-31 23:59:59+00'", False),
    ("'4713-01-01 00:00:00+00 BC'", False), ("'2024-02-29 12:00:00.5+05:30'", True),
]
PG_TIMESTAMP: list[Odd] = [
    ("NULL", None), ("'infinity'", False), ("'-infinity'", False), ("'9999-12-31 23:59:59.999999'", True),
    ("'0001-01-01 00:00:00'", True), ("'10000-01-01 00:00:00'", False), ("'0001-01-01 00:00:00 BC'", False),
    ("'294276-12-31 23:59:59'", False), ("'2024-02-29 12:00:00.5'", True),
]
PG_DATE: list[Odd] = [
    ("NULL", None), ("'infinity'", False), ("'-infinity'", False), ("'9999-12-31'", True),
    ("'0001-01-01'", True), ("'10000-01-01'", False), ("'5874897-12-31'", False), ("'4713-01-01 BC'", False),
    ("'2024-02-29'", True),
]
# A timestamp column of text or numbers: ISO-8601 text, or seconds since the epoch.
PG_TEXT_TIME: list[Odd] = [
    ("NULL", None), ("''", False), ("'garbage'", False), ("'infinity'", False),
    ("'2024-13-45 00:00:00'", False),
    ("'2024-02-29T12:00:00.5+05:30'", True), ("'9999-12-31 23:59:59'", True), ("'10000-01-01'", False),
    ("'2024-05-01'", True), ("'ünïcødé ☃'", False),
]
PG_EPOCH: list[Odd] = [
    ("NULL", None), ("0", True), ("-1", True), ("1700000000", True), ("253402300799", True),
    ("253402300800", False), ("-62135596800", None), ("9223372036854775807", False),
    ("-9223372036854775808", False),
]
PG_EPOCH_DOUBLE: list[Odd] = [
    ("NULL", None), ("0", True), ("1700000000.25", True), ("'NaN'", False), ("'Infinity'", False),
    ("'-Infinity'", False), ("1.7976931348623157e308", False), ("4.9e-324", True),
]
PG_TYPES: dict[str, list[Odd]] = {
    "TEXT": PG_TEXT + PG_LONG_TEXT, "VARCHAR(100)": PG_TEXT, "DOUBLE PRECISION": PG_DOUBLE,
    "NUMERIC": PG_NUMERIC, "TIMESTAMPTZ": PG_TIMESTAMPTZ, "TIMESTAMP": PG_TIMESTAMP, "DATE": PG_DATE,
}
PG_TIME_TYPES: dict[str, list[Odd]] = {
    "TIMESTAMPTZ": PG_TIMESTAMPTZ, "TIMESTAMP": PG_TIMESTAMP, "DATE": PG_DATE, "TEXT": PG_TEXT_TIME,
    "BIGINT": PG_EPOCH, "DOUBLE PRECISION": PG_EPOCH_DOUBLE,
}
PG_TIME_GOOD = {"TIMESTAMPTZ": "now()", "TIMESTAMP": "localtimestamp", "DATE": "current_date",
                "TEXT": "now()::text", "BIGINT": "extract(epoch from now())::bigint",
                "DOUBLE PRECISION": "extract(epoch from now())"}
# A timestamp the lag cannot be taken from, per timestamp column type.
PG_NO_AGE = {"TEXT": "'garbage'", "BIGINT": "9223372036854775807", "DOUBLE PRECISION": "'NaN'"}
PG_GOOD = {"TEXT": "'n'", "VARCHAR(100)": "'n'", "DOUBLE PRECISION": "1.5", "NUMERIC": "1.5",
           "TIMESTAMPTZ": "now()", "TIMESTAMP": "localtimestamp", "DATE": "current_date"}
PG_IDS = {"BIGINT": [-(2**63), -(2**63) + 1, -(2**53) - 1, -1, 0, 2**53 + 1, 2**63 - 2, 2**63 - 1],
          "INTEGER": [-(2**31), -(2**31) + 1, -1, 0, 2**31 - 2, 2**31 - 1],
          "NUMERIC(20)": [-(10**20) + 1, -(2**63) - 1, -1, 0, 2**63, 2**64 - 1, 10**20 - 1]}


@dataclass(frozen=True)
class Variant:
    """A seed-shaped table: the type of each column. `created` means `pool init-db` makes it."""

    label: str
    id: str = "BIGINT"
    name: str = "TEXT"
    value: str = "DOUBLE PRECISION"
    source: str = "TEXT"
    timestamp: str = "TIMESTAMPTZ"
    created: bool = False

    def create_sql(self) -> str:
        return (f"CREATE TABLE signals (id {self.id} PRIMARY KEY, name {self.name}, value {self.value},"
                f" source {self.source}, timestamp {self.timestamp}, processed INTEGER NOT NULL DEFAULT 0)")


# One list, so that a column type is one line more.
PG_VARIANTS = [
    Variant("created-by-init-db", created=True),
    Variant("timestamp-without-time-zone", timestamp="TIMESTAMP"),
    Variant("date-timestamp", timestamp="DATE"),
    Variant("text-timestamp", timestamp="TEXT"),
    Variant("bigint-epoch-timestamp", timestamp="BIGINT"),
    Variant("double-epoch-timestamp", timestamp="DOUBLE PRECISION"),
    Variant("numeric-value", value="NUMERIC"),
    Variant("integer-id", id="INTEGER"),
    Variant("numeric-id", id="NUMERIC(20)"),
    Variant("varchar-name", name="VARCHAR(100)"),
]

SQLITE_TEXT: list[Odd] = [
    ("NULL", None), ("''", True), ("'ünïcødé ☃ 😀'", True), ("'a' || char(0) || 'b'", True),
    ("x'fffe'", False), ("x'706c61696e'", True), ("CAST(x'ff' AS TEXT)", False), ("42", True),
    ("replace(hex(zeroblob(35000)), '0', 'x')", False),
]
SQLITE_REAL: list[Odd] = [
    ("NULL", None), ("0", True), ("-0.0", True), ("1e308", True), ("9e999", False), ("-9e999", False),
    ("9223372036854775807", True), ("'1.5'", True), ("'abc'", False), ("x'00'", False),
    ("'NaN'", False), ("'Infinity'", False), ("'1e400'", False),
]
SQLITE_TIMESTAMP: list[Odd] = [
    ("'2024-01-01T00:00:00'", True), ("'2024-01-01 00:00:00.123+05:30'", True),
    ("'9999-12-31T23:59:59.999999'", True), ("'2024-01-01'", True), ("'not a time'", False), ("''", False),
    ("0", True), ("1700000000.5", True), ("1e20", False), ("-1e20", False), ("253402300800", False),
    ("'infinity'", False), ("x'ff'", False), ("CAST(x'ff' AS TEXT)", False),
]
SQLITE_COLUMNS = {"name": SQLITE_TEXT, "value": SQLITE_REAL, "source": SQLITE_TEXT,
                  "timestamp": SQLITE_TIMESTAMP}
SQLITE_GOOD = {"name": "'n'", "value": "1.5", "source": "'s'", "timestamp": "'2024-05-01 12:00:00'"}
SQLITE_IDS = [-(2**63), -(2**63) + 1, -1, 0, 2**63 - 2, 2**63 - 1]


@dataclass
class Table:
    """The rows to insert, as SQL per column, and what each odd row must become."""

    rows: list[dict[str, object]]
    pinned: dict[int, bool]  # row id -> must be relayed (True) or must die (False)


def build_table(columns: dict[str, list[Odd]], good: dict[str, str], odd_ids: list[int],
                nullable_timestamp: bool) -> Table:
    rows: list[dict[str, object]] = []
    pinned: dict[int, bool] = {}
    next_id = 1000

    def add(row_id: int, **odd: str) -> None:
        rows.append({"id": row_id, **good, **odd})

    for column, values in columns.items():
        for sql, relayed in values:
            if sql == "NULL":
                if column == "timestamp" and not nullable_timestamp:
                    continue
                relayed = NULL_RELAYED[column]
            add(next_id, **{column: sql})
            if relayed is not None:
                pinned[next_id] = relayed
            next_id += 1
            for _ in range(GOOD_PER_ODD):
                add(next_id)
                pinned[next_id] = True
                next_id += 1
    for row_id in odd_ids:  # ids at the edges of the id type, each a good row
        add(row_id)
        pinned[row_id] = True
    return Table(rows, pinned)


def insert_sql(table: Table) -> str:
    values = ", ".join(
        f"({r['id']}, {r['name']}, {r['value']}, {r['source']}, {r['timestamp']})" for r in table.rows
    )
    return f"INSERT INTO signals (id, name, value, source, timestamp) VALUES {values}"


def init_db(db_url: str) -> None:
    """`pool init-db`, in this process: a subprocess would add a second of imports per variant."""
    store = open_store(make_settings(db_url=db_url))
    try:
        store.init_schema()
    finally:
        store.close()


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        return probe.getsockname()[1]


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def status_json(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/status.json", timeout=5) as response:
        return json.loads(response.read())


def healthy(port: int) -> bool:
    """/readyz says ready and the coordinator's status names no problem."""
    return http_status(f"http://127.0.0.1:{port}/readyz") == 200 and not status_json(port)["problems"]


def assert_status_works(env, cwd) -> dict:
    result = run_pool("status", "--json", env=env, cwd=cwd)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["status"] is not None and not report["status"]["problems"], report
    return report


def read_state(db_url: str) -> dict[int, dict]:
    """Every row's relay state and its values as the claim reads them."""
    if db_url.startswith("sqlite"):
        engine = create_db_engine(db_url)  # the store's text decoding
        try:
            with engine.connect() as conn:
                rows = conn.execute(text(
                    "SELECT id, name, value, source, timestamp, attempts, processed, dead_at, last_error,"
                    " lease_owner FROM signals")).all()
        finally:
            engine.dispose()
    else:
        with psycopg.connect(db_url) as conn:
            register_tolerant_loaders(conn.adapters)  # stock loads where they can, as the claim's
            rows = conn.execute(
                "SELECT id, name, value, source, timestamp, attempts, processed, dead_at, last_error,"
                " lease_owner FROM signals").fetchall()
    return {r[0]: {"row": ClaimedRow(r[0], r[1], r[2], r[3], r[4], 0), "attempts": r[5], "processed": r[6],
                   "dead": r[7] is not None, "last_error": r[8], "leased": r[9] is not None} for r in rows}


def pending(db_url: str) -> int:
    return sum(1 for s in read_state(db_url).values() if not s["processed"] and not s["dead"])


def relay(db_url: str, table: Table, redis_url: str, queue_name: str, tmp_path: Path,
          no_age: str = "'infinity'") -> None:
    port = free_port()
    env = clean_env(PULSE_DB_URL=db_url, PULSE_BROKER_URL=redis_url, PULSE_QUEUE=queue_name,
                    PULSE_BATCH_SIZE=str(BATCH), PULSE_LEASE_SECONDS=str(LEASE), PULSE_METRICS_PORT=str(port),
                    PULSE_STATUS_INTERVAL="0.2", PULSE_DB_POLL_INTERVAL="0.2", PULSE_HOST_ID="fuzz")
    started = time.monotonic()
    pool = PoolProcess("start", "--workers", str(WORKERS), env=env, cwd=tmp_path)
    try:
        pool.wait_for_line(rf"ready: {WORKERS} pollers, metrics on http://127\.0\.0\.1:{port}/metrics")
        wait_until(lambda: healthy(port), timeout=15, message="/readyz 200 and no problems after start")

        def drained() -> bool:
            assert healthy(port)  # the coordinator keeps answering while odd rows go through
            return pending(db_url) == 0

        wait_until(drained, timeout=DRAIN_BOUND - (time.monotonic() - started), interval=0.1,
                   message="no pending rows left")
        check_outcomes(db_url, table, redis_url, queue_name)
        check_coordinator_with_an_ageless_oldest_row(db_url, env, tmp_path, port, no_age)
        assert "Traceback" not in pool.output()
    finally:
        pool.kill()  # a graceful stop is tested elsewhere; here it would only cost time


def check_outcomes(db_url: str, table: Table, redis_url: str, queue_name: str) -> None:
    state = read_state(db_url)
    assert sorted(state) == sorted(r["id"] for r in table.rows)
    client = redis.Redis.from_url(redis_url)
    try:
        raw = client.lrange(queue_name, 0, -1)
        messages = {json.loads(m)["headers"]["id"]: m for m in raw}
        assert len(messages) == len(raw), "a row was published twice"
        expected: list[ClaimedRow] = []
        for row_id, s in sorted(state.items()):
            row = s["row"]
            try:
                payload = prepare(row).payload
            except PayloadError as exc:
                # Dead at once, with its own error, and never published.
                assert s["dead"] and not s["processed"], (row_id, s)
                assert (s["attempts"], s["last_error"]) == (1, str(exc)), (row_id, s)
                assert f"signal-{row_id}" not in messages
                assert table.pinned.get(row_id, False) is False, (row_id, str(exc))
                continue
            assert s["processed"] and not s["dead"] and not s["leased"], (row_id, s)
            assert s["attempts"] == 0, (row_id, s)  # it never waited on a failing batch-mate
            assert table.pinned.get(row_id, True) is True, (row_id, payload)
            body = json.loads(messages[f"signal-{row_id}"])
            assert body["headers"]["task"] == "ingest_and_score_signal"
            expected.append(row)
        assert len(messages) == len(expected)
        # Field by field: what pool put on the queue is what send_task puts there for these rows.
        relayed = {task_id: comparable(m) for task_id, m in messages.items()}
        client.delete(queue_name)
        reference = Publisher(make_settings(broker_url=redis_url, queue=queue_name))
        try:
            assert reference.publish(expected).accepted == [r.id for r in expected]
        finally:
            reference.close()
        by_send_task = {json.loads(m)["headers"]["id"]: comparable(m)
                        for m in client.lrange(queue_name, 0, -1)}
        assert relayed == by_send_task
    finally:
        client.close()


def check_coordinator_with_an_ageless_oldest_row(db_url: str, env, cwd, port: int, no_age: str) -> None:
    """A pending row whose timestamp has no age (not due yet, so it stays) is the oldest one:
    lag, /readyz and `pool status` must not fail on it."""
    if db_url.startswith("sqlite"):
        sql = ("INSERT INTO signals (id, name, value, source, timestamp, next_attempt_at)"
               " VALUES (-(1 << 62), 'n', 1, 's', 'infinity', '9999-01-01 00:00:00')")
        with sqlite3.connect(db_url.removeprefix("sqlite:///")) as conn:
            conn.execute(sql)
    else:
        with psycopg.connect(db_url) as conn:
            conn.execute("INSERT INTO signals (id, name, value, source, timestamp, next_attempt_at)"
                         f" VALUES (-(1::bigint << 30), 'n', 1, 's', {no_age}, 'infinity')")
    wait_until(lambda: status_json(port).get("backlog") == 1, timeout=15,
               message="the coordinator counting the not-yet-due row")
    assert healthy(port)
    assert assert_status_works(env, cwd)["unprocessed"] == 1


@pytest.mark.parametrize("variant", PG_VARIANTS, ids=[v.label for v in PG_VARIANTS])
def test_postgres_rows_of_every_kind_are_relayed_or_dead_on_their_own(variant, pg_url, redis_url,
                                                                       queue_name, tmp_path):
    columns = {"name": PG_TYPES[variant.name], "value": PG_TYPES[variant.value],
               "source": PG_TYPES[variant.source], "timestamp": PG_TIME_TYPES[variant.timestamp]}
    good = {"name": PG_GOOD[variant.name], "value": PG_GOOD[variant.value], "source": PG_GOOD[variant.source],
            "timestamp": PG_TIME_GOOD[variant.timestamp]}
    table = build_table(columns, good, PG_IDS[variant.id], nullable_timestamp=not variant.created)
    if not variant.created:
        with psycopg.connect(pg_url) as conn:
            conn.execute(variant.create_sql())
    init_db(pg_url)
    with psycopg.connect(pg_url) as conn:
        conn.execute(insert_sql(table))
    relay(pg_url, table, redis_url, queue_name, tmp_path, PG_NO_AGE.get(variant.timestamp, "'infinity'"))


def test_sqlite_rows_of_every_kind_are_relayed_or_dead_on_their_own(sqlite_url, redis_url, queue_name,
                                                                     tmp_path):
    table = build_table(SQLITE_COLUMNS, SQLITE_GOOD, SQLITE_IDS, nullable_timestamp=False)
    init_db(sqlite_url)
    with sqlite3.connect(sqlite_url.removeprefix("sqlite:///")) as conn:
        conn.execute(insert_sql(table))
    relay(sqlite_url, table, redis_url, queue_name, tmp_path)
