"""PostgreSQL store: SKIP LOCKED claims, a partial index on pending rows, COPY for seeding."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import TextClause, event, text
from sqlalchemy.engine import Connection, Engine

from pool.config import Settings
from pool.errors import ConfigError
from pool.store.base import SqlStore, first_line, shard_list
from pool.store.pg_loaders import register_tolerant_loaders
from pool.store.pg_notify import CHANNEL_OID_SQL, PgNotifyListener, notify_channel
from pool.store.timestamps import POSTGRES_KINDS, SUPPORTED, postgres_epoch, postgres_older_than

log = logging.getLogger(__name__)

RELAY_COLUMN_TYPES = {
    "lease_owner": "TEXT",
    "lease_until": "TIMESTAMPTZ",
    "lease_token": "BIGINT",
    "attempts": "INTEGER NOT NULL DEFAULT 0",
    "next_attempt_at": "TIMESTAMPTZ",
    "last_error": "TEXT",
    "dead_at": "TIMESTAMPTZ",
}


# Every claim and ack rewrites a row: leave room on each page for HOT updates, and vacuum
# after 2% of the table changed rather than PostgreSQL's default 20%, so dead tuples from
# steady churn are reclaimed before the table bloats.
STORAGE_SETTINGS = {
    "fillfactor": 90,
    "autovacuum_vacuum_scale_factor": 0.02,
    "autovacuum_vacuum_threshold": 1000,
    "autovacuum_analyze_scale_factor": 0.02,
}


# The claim must walk the pending index in id order and stop after `limit` rows. Without
# statistics (autovacuum off, or a big COPY since the last ANALYZE) the planner guessed one
# pending row and chose a bitmap scan that sorted the whole backlog: 54 ms per claim on 200k
# pending rows instead of 0.3 ms. Ruling out sorts leaves only the ordered index scan,
# whatever the statistics say. It is set for the session, once per connection, so that the
# claim stays a single statement in a single round trip; the store's other statements are
# keyed by id or aggregate, and a sort they cannot avoid still runs (off only makes it dear).
SESSION_SETTINGS = "SET enable_sort = off"

# The base type of a column (through a domain) and its type as a user would write it.
# Base types (pg_type.typname) an id column may have: each row's shard is computed from it.
INTEGER_ID_TYPES = ("int2", "int4", "int8")
WHOLE_NUMERIC = re.compile(r"numeric\(\d+,0\)")  # as format_type() shows numeric(20)
COLUMN_TYPE_SQL = """
    SELECT COALESCE(b.typname, t.typname), format_type(a.atttypid, a.atttypmod)
      FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
      LEFT JOIN pg_type b ON t.typtype = 'd' AND b.oid = t.typbasetype
     WHERE a.attrelid = to_regclass(:t) AND a.attname = :c AND a.attnum > 0 AND NOT a.attisdropped"""


def configure_postgres_engine(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.execute(SESSION_SETTINGS)
        dbapi_connection.commit()  # a SET rolled back with its transaction would be undone


class PostgresStore(SqlStore):
    dialect_name = "postgresql"
    relay_column_types = RELAY_COLUMN_TYPES

    def __init__(self, engine: Engine, settings: Settings) -> None:
        super().__init__(engine, settings)
        self._kind: str | None = None  # how the timestamp column is read, once looked up
        # One round trip per statement: no BEGIN and COMMIT around it.
        self._autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")

    def _statement_engine(self) -> Engine:
        return self._autocommit

    def _lock_schema(self, conn: Connection) -> None:
        # Two concurrent init-db runs would race on ADD COLUMN.
        conn.execute(text("SELECT pg_advisory_xact_lock(hashtext('pool-init-db'))"))

    def _notify_channel(self, conn: Connection) -> str:
        oid = conn.exec_driver_sql(CHANNEL_OID_SQL, (self.t,)).scalar_one()
        return notify_channel(oid)

    def _ensure_extras(self, conn: Connection, notify: bool) -> tuple[str, ...]:
        created = []
        function = self.q(self.derived_name("pool_notify"))
        trigger = self.derived_name("pool_notify")
        have_trigger = conn.execute(
            text("SELECT 1 FROM pg_trigger WHERE tgrelid = to_regclass(:t) AND tgname = :n"),
            {"t": self.t, "n": trigger},
        ).first()
        if notify and have_trigger is None:
            # One NOTIFY per statement, not per row: a COPY of a million rows wakes pollers once.
            # Opt-in: every transaction that NOTIFYs takes a database-wide lock at commit, so
            # many small concurrent inserts commit one at a time (measured: 1,996 -> 1,439
            # single-row inserts/s from 20 clients, with nothing else running).
            channel = self._notify_channel(conn)
            conn.execute(text(
                f"CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS"
                f" $$ BEGIN PERFORM pg_notify('{channel}', ''); RETURN NULL; END $$"
            ))
            conn.execute(text(
                f"CREATE TRIGGER {self.q(trigger)} AFTER INSERT ON {self.t}"
                f" FOR EACH STATEMENT EXECUTE FUNCTION {function}()"
            ))
            created.append(f"trigger {trigger} (NOTIFY {channel})")
        options = conn.execute(
            text("SELECT COALESCE(reloptions, '{}') FROM pg_class WHERE oid = to_regclass(:t)"),
            {"t": self.t},
        ).scalar_one()
        wanted = [f"{k}={v}" for k, v in STORAGE_SETTINGS.items()]
        if not set(wanted) <= set(options):
            settings = ", ".join(f"{k} = {v}" for k, v in STORAGE_SETTINGS.items())
            conn.execute(text(f"ALTER TABLE {self.t} SET ({settings})"))
            created.append(f"storage settings {settings}")
        return tuple(created)

    def wake_listener(self) -> PgNotifyListener:
        url = self.engine.url.set(drivername="postgresql")
        return PgNotifyListener(url.render_as_string(hide_password=False), self.t)

    def _index_exists(self, conn: Connection, name: str) -> bool:
        return conn.execute(text("SELECT to_regclass(:i)"), {"i": self.q(name)}).scalar_one() is not None

    def _create_table_sql(self) -> str:
        c = self.settings.columns
        q = self.q
        return f"""
            CREATE TABLE {self.t} (
                {q(c.id)} BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
                {q(c.name)} TEXT,
                {q(c.value)} DOUBLE PRECISION,
                {q(c.source)} TEXT,
                {q(c.timestamp)} TIMESTAMPTZ NOT NULL DEFAULT now(),
                {q(c.processed)} INTEGER NOT NULL DEFAULT 0
            )"""

    def _now(self) -> str:
        # clock_timestamp(), not now(): now() is frozen at the start of the transaction.
        return "clock_timestamp()"

    def _plus_seconds(self, param: str) -> str:
        return f"clock_timestamp() + make_interval(secs => :{param})"

    def _minus_seconds(self, param: str) -> str:
        return f"clock_timestamp() - make_interval(secs => :{param})"

    def _time_type(self) -> str:
        return "TIMESTAMPTZ"

    def _table_exists(self, conn: Connection, name: str) -> bool:
        return conn.execute(text("SELECT to_regclass(:t)"), {"t": self.q(name)}).scalar_one() is not None

    def _age_seconds(self, column: str) -> str:
        # For the relay's own columns, which the relay writes; a hand-written 'infinity' there
        # must not fail the status read ("cannot subtract infinite timestamps").
        return f"CASE WHEN isfinite({column}) THEN EXTRACT(EPOCH FROM clock_timestamp() - {column}) END"

    def _check_column_types(self, conn: Connection) -> None:
        column = self.settings.columns.id
        found = conn.execute(text(COLUMN_TYPE_SQL), {"t": self.t, "c": column}).first()
        # Shards are id % count: a text id fails every claim of the table, forever, and a
        # fractional one lands on no shard at all.
        if found is not None and not (found[0] in INTEGER_ID_TYPES or WHOLE_NUMERIC.fullmatch(found[1])):
            raise ConfigError(
                f"column {column!r} of table {self.settings.table!r} is {found[1]}: pool needs integer"
                f" ids (smallint, integer, bigint or numeric(p,0)); change its type or set PULSE_DB_COLUMN_ID"
            )
        self._check_timestamp_column(conn)

    def _check_timestamp_column(self, conn: Connection) -> None:
        column = self.settings.columns.timestamp
        found = conn.execute(text(COLUMN_TYPE_SQL), {"t": self.t, "c": column}).first()
        if found is None:
            return  # a missing column is reported as such
        base_type, shown = found
        kind = POSTGRES_KINDS.get(base_type)
        if kind is None:
            raise ConfigError(
                f"column {column!r} of table {self.settings.table!r} is {shown}: pool reads times"
                f" from {SUPPORTED}; change its type or set PULSE_DB_COLUMN_TIMESTAMP"
            )
        self._kind = kind

    def _timestamp_kind(self) -> str:
        if self._kind is None:
            with self.engine.connect() as conn:
                self._check_timestamp_column(conn)
        if self._kind is None:
            column = self.settings.columns.timestamp
            raise ConfigError(f"table {self.settings.table!r} has no column {column!r}")
        return self._kind

    def _timestamp_age(self) -> str:
        epoch = postgres_epoch(self.q(self.settings.columns.timestamp), self._timestamp_kind())
        return f"EXTRACT(EPOCH FROM clock_timestamp())::float8 - ({epoch})"

    def _timestamp_older_than(self, param: str) -> str:
        return postgres_older_than(self.q(self.settings.columns.timestamp), self._timestamp_kind(), param)

    def _times_as_utc(self, conn: Connection) -> None:
        # A naive `timestamp` column of an old seed table is compared through the session's
        # time zone; the payload takes naive times as UTC, so retention must as well.
        conn.execute(text("SET LOCAL TimeZone = 'UTC'"))

    def _skip_locked(self) -> str:
        return " FOR UPDATE SKIP LOCKED"

    def _ids_clause(self) -> str:
        return f"{self.c_id} = ANY(:ids)"

    def _ids_statement(self, sql: str) -> TextClause:
        return text(sql)

    def _existing_columns(self, conn: Connection) -> set[str] | None:
        exists = conn.execute(text("SELECT to_regclass(:t)"), {"t": self.t}).scalar_one()
        if exists is None:
            return None
        rows = conn.execute(
            text(
                "SELECT attname FROM pg_attribute WHERE attrelid = to_regclass(:t)"
                " AND attnum > 0 AND NOT attisdropped"
            ),
            {"t": self.t},
        )
        return {r[0] for r in rows}

    def _pick_sql(self) -> str:
        return f"""
                SELECT {self.c_id}, lease_owner IS NOT NULL AS reclaimed FROM {self.t}
                WHERE {self.pending}
                  AND {self.shard_expr('shard_count')} = ANY(:shards)
                  -- re-pick rule: a row is free when unleased or when its lease ran out
                  -- (its poller died or stalled); a live holder keeps the row locked-out.
                  AND (lease_until IS NULL OR lease_until < clock_timestamp())
                  AND (next_attempt_at IS NULL OR next_attempt_at <= clock_timestamp())
                ORDER BY {self.c_id}
                LIMIT :limit
                FOR UPDATE SKIP LOCKED"""

    def explain_claim(self, shard_count: int, shard: int | Sequence[int], limit: int) -> dict:
        """The planner's JSON plan for the claim's row selection, to check it stays index-driven."""
        with self.engine.begin() as conn:
            plan = conn.execute(
                text(f"EXPLAIN (FORMAT JSON) {self._pick_sql()}"),
                {"shard_count": shard_count, "shards": shard_list(shard), "limit": limit},
            ).scalar_one()
            conn.rollback()
        return plan[0]["Plan"]

    def _claim_rows(self, params: dict[str, Any]) -> tuple[list[tuple], int]:
        c = self.settings.columns
        q = self.q
        sql = f"""
            WITH picked AS ({self._pick_sql()})
            UPDATE {self.t} AS s
               SET lease_owner = :owner, lease_token = :token,
                   lease_until = {self._plus_seconds('lease')}
              FROM picked
             WHERE s.{self.c_id} = picked.{self.c_id}
            RETURNING s.{q(c.id)}, s.{q(c.name)}, s.{q(c.value)}, s.{q(c.source)},
                      s.{q(c.timestamp)}, s.attempts, picked.reclaimed
        """
        statement = self._statement(sql)
        try:
            rows = self._one_statement(lambda conn: conn.execute(statement, params).all())
        except Exception as exc:
            if getattr(exc, "connection_invalidated", False):
                raise  # the database went away: nothing to read again
            # The claim commits before its rows are read: a value the driver cannot turn into
            # Python (a timestamp of 'infinity') fails the read of a batch that is leased to us
            # all the same. Read it again, tolerantly; without a lease it was a real failure.
            leased = self._read_leased_tolerantly(params["owner"], params["token"])
            if not leased:
                raise
            log.warning("claimed rows hold a value the driver cannot read (%s); read them again,"
                        " each such value as unreadable", first_line(exc))
            return leased, 0  # which rows were taken over is not known on this rare path
        return [tuple(r[:6]) for r in rows], sum(1 for r in rows if r[6])

    def _read_leased_tolerantly(self, owner: str, token: int) -> list[tuple]:
        """The pending rows leased to (owner, token), each value the driver cannot load read as
        an Unreadable. On the driver's own cursor: its loaders are this read's alone."""
        c = self.settings.columns
        sql = (
            f"SELECT {self.payload_columns}, attempts FROM {self.t}"
            f" WHERE lease_owner = %(owner)s AND lease_token = %(token)s AND {self.pending}"
            f" ORDER BY {self.q(c.id)}"
        )

        def read(conn: Connection) -> list[tuple]:
            with conn.connection.driver_connection.cursor() as cursor:
                register_tolerant_loaders(cursor.adapters)
                cursor.execute(sql, {"owner": owner, "token": token})
                return [tuple(r) for r in cursor.fetchall()]

        return self._one_statement(read)

    def insert_signals(self, rows: Sequence[Mapping[str, Any]]) -> int:
        c = self.settings.columns
        q = self.q
        copy_sql = (
            f"COPY {self.t} ({q(c.name)}, {q(c.value)}, {q(c.source)}, {q(c.timestamp)}) FROM STDIN"
        )
        with self.engine.begin() as conn:
            driver = conn.connection.driver_connection
            with driver.cursor() as cursor, cursor.copy(copy_sql) as copy:
                for row in rows:
                    copy.write_row((row["name"], row["value"], row["source"], row["timestamp"]))
        return len(rows)
