"""SQLite store: BEGIN IMMEDIATE + SELECT and UPDATE, WAL, a busy timeout."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.engine import Connection, Engine

from pool.errors import ConfigError
from pool.store.base import SqlStore
from pool.store.timestamps import sqlite_julian_day

# Times are stored as UTC text in one fixed format so that they compare as strings.
NOW = "strftime('%Y-%m-%d %H:%M:%f', 'now')"

RELAY_COLUMN_TYPES = {
    "lease_owner": "TEXT",
    "lease_until": "TEXT",
    "lease_token": "INTEGER",
    "attempts": "INTEGER NOT NULL DEFAULT 0",
    "next_attempt_at": "TEXT",
    "last_error": "TEXT",
    "dead_at": "TEXT",
}

BUSY_TIMEOUT_MS = 30_000


def _decode_text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def configure_sqlite_engine(engine: Engine) -> None:
    """WAL and immediate transactions: deferred ones fail at once with 'database is locked'
    when two pollers upgrade read locks to write locks together."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Python's sqlite3 would otherwise open its own deferred transactions.
        dbapi_connection.isolation_level = None
        # Invalid UTF-8 in one row would otherwise fail the whole batch's fetch; decoded this
        # way it reaches the payload check, which rejects that row alone.
        dbapi_connection.text_factory = _decode_text
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


class SqliteStore(SqlStore):
    dialect_name = "sqlite"
    fold_case = True  # SQLite's names are case-insensitive: Signals and signals are one table
    relay_column_types = RELAY_COLUMN_TYPES

    def _index_exists(self, conn: Connection, name: str) -> bool:
        found = conn.execute(
            text("SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = :i COLLATE NOCASE"), {"i": name}
        ).first()
        return found is not None

    def _create_table_sql(self) -> str:
        c = self.settings.columns
        q = self.q
        return f"""
            CREATE TABLE {self.t} (
                {q(c.id)} INTEGER PRIMARY KEY,
                {q(c.name)} TEXT,
                {q(c.value)} REAL,
                {q(c.source)} TEXT,
                {q(c.timestamp)} TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
                {q(c.processed)} INTEGER NOT NULL DEFAULT 0
            )"""

    def _now(self) -> str:
        return NOW

    def _plus_seconds(self, param: str) -> str:
        return f"strftime('%Y-%m-%d %H:%M:%f', 'now', '+' || :{param} || ' seconds')"

    def _minus_seconds(self, param: str) -> str:
        return f"strftime('%Y-%m-%d %H:%M:%f', 'now', '-' || :{param} || ' seconds')"

    def _time_type(self) -> str:
        return "TEXT"

    def _table_exists(self, conn: Connection, name: str) -> bool:
        found = conn.execute(
            text("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = :t COLLATE NOCASE"), {"t": name}
        ).first()
        return found is not None

    def check_schema(self) -> None:
        # Connecting would create an empty file; a missing file is a configuration mistake.
        path = self.engine.url.database
        if path and not os.path.exists(path):
            raise ConfigError(
                f"SQLite database file {path!r} does not exist; check PULSE_DB_URL or run `pool init-db`"
            )
        super().check_schema()

    def _age_seconds(self, column: str) -> str:
        return f"(julianday('now') - julianday({column})) * 86400.0"

    def _timestamp_age(self) -> str:
        day = sqlite_julian_day(self.q(self.settings.columns.timestamp))
        return f"(julianday('now') - {day}) * 86400.0"

    def _timestamp_older_than(self, param: str) -> str:
        # julianday() reads every ISO-8601 form in use (space or T, with or without an offset,
        # naive taken as UTC), where a text comparison would not; an unreadable value gives
        # NULL, so such a row is kept.
        day = sqlite_julian_day(self.q(self.settings.columns.timestamp))
        return f"{day} <= julianday('now') - :{param} / 86400.0"

    def _existing_columns(self, conn: Connection) -> set[str] | None:
        rows = conn.execute(text(f"PRAGMA table_info({self.t})")).all()
        return {r[1] for r in rows} or None

    def _claim_rows(self, params: dict[str, Any]) -> tuple[list[tuple], int]:
        pick = f"""
            SELECT {self.payload_columns}, attempts, lease_owner IS NOT NULL FROM {self.t}
             WHERE {self.pending}
               AND {self.shard_expr('shard_count')} IN :shards
               -- re-pick rule: free when unleased or when its lease ran out
               AND (lease_until IS NULL OR lease_until < {NOW})
               AND (next_attempt_at IS NULL OR next_attempt_at <= {NOW})
             ORDER BY {self.c_id}
             LIMIT :limit"""
        # The rows are read by the SELECT, in the same immediate transaction as the UPDATE, so
        # nothing changes in between. Not by RETURNING: it shows a REAL column's whole numbers
        # as SQLite stores them, as integers (5 where a SELECT reads 5.0), and it would show
        # only the new lease, not whether the row was taken over from an expired one.
        update = f"""
            UPDATE {self.t}
               SET lease_owner = :owner, lease_token = :token,
                   lease_until = {self._plus_seconds('lease')}
             WHERE {self._ids_clause()}
        """
        with self.engine.begin() as conn:
            picked = conn.execute(self._statement(pick, expanding=("shards",)), params).all()
            if picked:
                lease = {k: v for k, v in params.items() if k != "shards"}
                conn.execute(self._statement(update, with_ids=True), lease | {"ids": [r[0] for r in picked]})
        return [tuple(r[:6]) for r in picked], sum(1 for r in picked if r[6])

    def insert_signals(self, rows: Sequence[Mapping[str, Any]]) -> int:
        c = self.settings.columns
        q = self.q
        sql = (
            f"INSERT INTO {self.t} ({q(c.name)}, {q(c.value)}, {q(c.source)}, {q(c.timestamp)})"
            " VALUES (:name, :value, :source, :timestamp)"
        )
        params = [
            {**row, "timestamp": row["timestamp"].isoformat()
             if hasattr(row["timestamp"], "isoformat") else row["timestamp"]}
            for row in rows
        ]
        with self.engine.begin() as conn:
            conn.execute(text(sql), params)
        return len(rows)
