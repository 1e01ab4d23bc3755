"""The Store seam: what the relay needs from a database, and the SQL both dialects share."""

from __future__ import annotations

import contextlib
import math
import secrets
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, TypeVar

from sqlalchemy import TextClause, bindparam, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, NoSuchTableError

from pool.config import RELAY_COLUMNS, Settings
from pool.errors import ConfigError
from pool.redact import redact_url
from pool.store import names
from pool.store.shards import ShardLeaseTables

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Unreadable:
    """A value the database holds but the driver cannot turn into Python (a timestamp of
    'infinity', a year past 9999): the row it is in cannot be relayed as it is."""

    text: str  # the value as the database sent it
    reason: str  # the driver's error

    def __str__(self) -> str:
        return f"{self.text[:40]!r} cannot be read ({self.reason})"


@dataclass(frozen=True)
class ClaimedRow:
    id: int
    name: Any
    value: Any
    source: Any
    timestamp: Any
    attempts: int


@dataclass(frozen=True)
class Lease:
    """Who holds a claimed batch: acks and nacks only touch rows that still carry both."""

    owner: str
    token: int


@dataclass(frozen=True)
class Claim:
    lease: Lease
    rows: list[ClaimedRow]
    reclaimed: int = 0  # rows of this claim whose earlier lease had expired (taken over)


@dataclass(frozen=True)
class Counts:
    processed: int
    unprocessed: int  # still to be relayed: neither processed nor dead
    dead: int


@dataclass(frozen=True)
class Failure:
    """A row that failed to publish: why, when to try again, and whether it is now dead."""

    id: int
    error: str
    retry_in: float
    dead: bool


@dataclass(frozen=True)
class DeadRow:
    id: int
    attempts: int
    last_error: str | None
    age_seconds: float


@dataclass(frozen=True)
class BacklogStats:
    """What the coordinator reports about the table, read on an interval."""

    backlog: int  # unprocessed and not dead
    oldest_age_seconds: float | None  # of the lowest-id unprocessed row; None when there is none
    dead: int
    by_shard: dict[int, int]  # shard (shard_of(id, shard_count)) -> backlog


@dataclass(frozen=True)
class SchemaChanges:
    created_table: bool
    added_columns: tuple[str, ...]
    created_indexes: tuple[str, ...]
    created_extras: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        return (self.created_table or bool(self.added_columns) or bool(self.created_indexes)
                or bool(self.created_extras))


class WakeListener(Protocol):
    def listen(self) -> None: ...

    def wait(self, seconds: float, stop: Callable[[], bool]) -> bool:
        """Block up to `seconds` or until woken (True) or until stop() holds."""
        ...

    def wake_peers(self) -> None:
        """Wake the other pollers' waits (never this one's)."""
        ...

    def close(self) -> None: ...


def shard_of(row_id: int, shard_count: int) -> int:
    """The shard a row belongs to: always in 0..shard_count-1, negative ids included (Python's %
    floors; SQL's truncates, hence `SqlStore.shard_expr`)."""
    return row_id % shard_count


def shard_list(shard: int | Sequence[int]) -> list[int]:
    """A claim asks for one shard (an int) or several."""
    return [shard] if isinstance(shard, int) else list(shard)


def new_lease(owner: str) -> Lease:
    # A fresh random token per claim: a poller that lost its lease to another one can no
    # longer match (owner, token), even if it reuses the same owner name after a restart.
    return Lease(owner=owner, token=secrets.randbits(62))


class SqlStore(ShardLeaseTables):
    """SQL shared by PostgreSQL and SQLite; subclasses supply what differs."""

    dialect_name = ""
    fold_case = False  # whether the database compares names without regard to case

    def __init__(self, engine: Engine, settings: Settings) -> None:
        self.engine = engine
        self.settings = settings
        self._kept: Connection | None = None
        self._kept_lock = threading.Lock()
        self._statements: dict[tuple[str, bool, tuple[str, ...]], TextClause] = {}
        quote = engine.dialect.identifier_preparer.quote
        self.q = quote
        cols = settings.columns
        self.t = quote(settings.table)
        self.c_id = quote(cols.id)
        self.c_processed = quote(cols.processed)
        # The partial indexes' predicates. A query must spell them exactly so for the planner
        # to answer it from the index, hence one definition for the index and every query.
        self.pending = f"{self.c_processed} = 0 AND dead_at IS NULL"
        self.dead = "dead_at IS NOT NULL"
        self.payload_columns = ", ".join(
            quote(c) for c in (cols.id, cols.name, cols.value, cols.source, cols.timestamp)
        )

    def shard_expr(self, param: str) -> str:
        """`shard_of(id, :param)` in SQL, the one definition for every query that maps a row to
        its shard. SQL's % takes the sign of the id, so a negative id would land on a negative
        shard that no poller holds; adding the count once brings it into 0..count-1 without
        overflow, since |id % n| < n."""
        return f"(({self.c_id} % :{param}) + :{param}) % :{param}"

    def derived_name(self, suffix: str) -> str:
        """The unquoted name of this table's index, shard table or trigger `suffix`."""
        return names.derived_name(self.settings.table, suffix, self.fold_case)

    # --- dialect hooks -------------------------------------------------------------
    def _statement_engine(self) -> Engine:
        """Where single statements run: each is its own transaction."""
        return self.engine

    def _now(self) -> str:
        raise NotImplementedError

    def _plus_seconds(self, param: str) -> str:
        raise NotImplementedError

    def _minus_seconds(self, param: str) -> str:
        raise NotImplementedError

    def _time_type(self) -> str:
        raise NotImplementedError

    def _table_exists(self, conn: Connection, name: str) -> bool:
        raise NotImplementedError

    def _existing_columns(self, conn: Connection) -> set[str] | None:
        raise NotImplementedError

    def _age_seconds(self, column: str) -> str:
        raise NotImplementedError

    def _check_column_types(self, conn: Connection) -> None:
        """Refuse, with a ConfigError, an id column that holds no integers or a timestamp column
        of a type the relay cannot read times from (where the database has column types to
        speak of); a missing column is reported elsewhere."""

    def _timestamp_age(self) -> str:
        """The age in seconds of the timestamp column's value by the database clock, NULL where
        the value names no readable time (pool/store/timestamps.py); never an error."""
        raise NotImplementedError

    def _timestamp_older_than(self, param: str) -> str:
        """A condition: the timestamp column lies at least :param seconds before the database
        clock; false or NULL for an unreadable value; never an error."""
        raise NotImplementedError

    def _times_as_utc(self, conn: Connection) -> None:
        """Make naive times in this transaction compare as UTC, as the payload reads them."""

    def _skip_locked(self) -> str:
        """What makes a row selection pass over rows another transaction has locked."""
        return ""

    def _claim_rows(self, params: dict[str, Any]) -> tuple[list[tuple], int]:
        """Lease up to `limit` due rows of `shards` to (owner, token), all in `params`; returns their
        (id, name, value, source, timestamp, attempts) and how many were taken over."""
        raise NotImplementedError

    def _create_table_sql(self) -> str:
        raise NotImplementedError

    def _index_exists(self, conn: Connection, name: str) -> bool:
        raise NotImplementedError

    def _lock_schema(self, conn: Connection) -> None:
        """Serialise concurrent init-db runs where the database needs it."""

    def _ensure_extras(self, conn: Connection, notify: bool) -> tuple[str, ...]:
        """Dialect-specific extras (triggers, storage settings); returns what it created."""
        return ()

    def wake_listener(self) -> WakeListener | None:
        """Something that wakes an idle poller when rows are inserted, if the database can."""
        return None

    def insert_signals(self, rows: Sequence[Mapping[str, Any]]) -> int:
        raise NotImplementedError

    # --- shared --------------------------------------------------------------------
    def claim(self, owner: str, shard_count: int, shard: int | Sequence[int], limit: int,
              lease_seconds: float) -> Claim:
        """Lease up to `limit` due rows of the given shard(s): rows whose shard_of(id, shard_count)
        is one of them."""
        shards = shard_list(shard)
        lease = new_lease(owner)
        if not shards:
            return Claim(lease=lease, rows=[])
        params = {
            "shard_count": shard_count, "shards": shards, "limit": limit,
            "owner": lease.owner, "token": lease.token, "lease": lease_seconds,
        }
        rows, reclaimed = self._claim_rows(params)
        claimed = sorted((ClaimedRow(*r) for r in rows), key=lambda r: r.id)
        return Claim(lease=lease, rows=claimed, reclaimed=reclaimed)

    def _one_statement(self, work: Callable[[Connection], T]) -> T:
        """Run one statement as its own transaction, on a connection the store keeps.

        Checking a connection out of the pool for every statement cost some 175 us of CPU,
        more than the claim itself. A kept connection that died while idle (the database
        restarted) is replaced and the statement run again, once, instead of pinging before
        every statement; each statement here is safe to repeat. The poller thread and its
        heartbeat thread share the connection, one statement at a time."""
        with self._kept_lock:
            for attempt in (1, 2):
                if self._kept is None:
                    self._kept = self._statement_engine().connect()
                conn = self._kept
                try:
                    with conn.begin():
                        return work(conn)
                except DBAPIError as exc:
                    if conn.invalidated:
                        self._drop_kept()
                    if attempt == 2 or not exc.connection_invalidated:
                        raise
        raise AssertionError("unreachable")

    def _drop_kept(self) -> None:
        conn, self._kept = self._kept, None
        if conn is not None:
            with contextlib.suppress(Exception):  # a dead connection may fail to close, too
                conn.close()

    relay_column_types: Mapping[str, str] = {}

    def init_schema(self, notify: bool = False) -> SchemaChanges:
        """Create the table, or add the relay's columns and index to an existing one; with
        `notify`, also the insert trigger that wakes idle pollers (PostgreSQL only).

        Existing rows are left as they are; a second run finds nothing to do."""
        names.check_table_name(self.settings.table)
        with self.engine.begin() as conn:
            self._lock_schema(conn)
            existing = self._existing_columns(conn)
            created = existing is None
            if created:
                conn.execute(text(self._create_table_sql()))
                existing = self._existing_columns(conn) or set()
            self._check_column_types(conn)
            added = tuple(name for name in self.relay_column_types if name not in existing)
            for name in added:
                column_type = self.relay_column_types[name]
                conn.execute(text(f"ALTER TABLE {self.t} ADD COLUMN {self.q(name)} {column_type}"))
            # Partial indexes: the claim walks only live unprocessed rows in id order, so it
            # stays index-driven however many processed or dead rows pile up; the status
            # counts of pending and dead rows read only these small indexes.
            wanted = {
                self.derived_name("pool_pending"): self.pending,
                self.derived_name("pool_dead"): self.dead,
            }
            indexes: tuple[str, ...] = ()
            for name, predicate in wanted.items():
                if not self._index_exists(conn, name):
                    conn.execute(text(
                        f"CREATE INDEX {self.q(name)} ON {self.t} ({self.c_id}) WHERE {predicate}"
                    ))
                    indexes = (*indexes, name)
            extras = self._ensure_shard_tables(conn) + self._ensure_extras(conn, notify)
        return SchemaChanges(
            created_table=created, added_columns=() if created else added,
            created_indexes=indexes, created_extras=extras,
        )

    def _ids_clause(self) -> str:
        return f"{self.c_id} IN :ids"

    def _ids_statement(self, sql: str) -> TextClause:
        return text(sql).bindparams(bindparam("ids", expanding=True))

    def _statement(self, sql: str, with_ids: bool = False, expanding: tuple[str, ...] = ()) -> TextClause:
        """The statement for this SQL, built once: a new text() per call costs more CPU than a
        small claim's round trip. `expanding` names list parameters written as `IN :name`."""
        key = (sql, with_ids, expanding)
        statement = self._statements.get(key)
        if statement is None:
            statement = self._ids_statement(sql) if with_ids else text(sql)
            if expanding:
                statement = statement.bindparams(*(bindparam(name, expanding=True) for name in expanding))
            self._statements[key] = statement
        return statement

    def _execute_for_ids(self, sql: str, ids: Iterable[int], params: dict[str, Any]) -> int:
        ids = list(ids)
        if not ids:
            return 0
        statement = self._statement(sql, with_ids=True)
        return self._one_statement(lambda conn: conn.execute(statement, {"ids": ids, **params}).rowcount)

    def ack(self, lease: Lease, ids: Iterable[int]) -> int:
        """Mark rows processed, only where this lease still holds them. Returns rows marked."""
        sql = (
            f"UPDATE {self.t} SET {self.c_processed} = 1, lease_owner = NULL, lease_until = NULL,"
            f" last_error = NULL"
            f" WHERE {self._ids_clause()} AND lease_owner = :owner AND lease_token = :token"
        )
        return self._execute_for_ids(sql, ids, {"owner": lease.owner, "token": lease.token})

    def release(self, lease: Lease, ids: Iterable[int]) -> int:
        """Give rows back unpublished so any poller can claim them at once."""
        sql = (
            f"UPDATE {self.t} SET lease_owner = NULL, lease_until = NULL"
            f" WHERE {self._ids_clause()} AND lease_owner = :owner AND lease_token = :token"
        )
        return self._execute_for_ids(sql, ids, {"owner": lease.owner, "token": lease.token})

    def nack(self, lease: Lease, failures: Sequence[Failure]) -> int:
        """Record failed publishes: attempts + 1, the error, the next try or death."""
        if not failures:
            return 0
        sql = (
            f"UPDATE {self.t} SET attempts = attempts + 1, last_error = :error,"
            f" next_attempt_at = {self._plus_seconds('delay')},"
            f" dead_at = CASE WHEN :dead = 1 THEN {self._now()} ELSE NULL END,"
            f" lease_owner = NULL, lease_until = NULL"
            f" WHERE {self.c_id} = :id AND lease_owner = :owner AND lease_token = :token"
        )
        params = [
            {"id": f.id, "error": f.error[:2000], "delay": f.retry_in, "dead": int(f.dead),
             "owner": lease.owner, "token": lease.token}
            for f in failures
        ]
        with self.engine.begin() as conn:
            return conn.execute(text(sql), params).rowcount

    def extend_lease(self, lease: Lease, lease_seconds: float) -> int:
        """Heartbeat: push the expiry of rows this lease still holds. Returns rows extended."""
        sql = (
            f"UPDATE {self.t} SET lease_until = {self._plus_seconds('lease')}"
            f" WHERE lease_owner = :owner AND lease_token = :token AND {self.c_processed} = 0"
        )
        params = {"owner": lease.owner, "token": lease.token, "lease": lease_seconds}
        statement = self._statement(sql)
        return self._one_statement(lambda conn: conn.execute(statement, params).rowcount)

    # --- dead letters ----------------------------------------------------------------
    def list_dead(self, limit: int = 100) -> list[DeadRow]:
        sql = (
            f"SELECT {self.c_id}, attempts, last_error, {self._age_seconds('dead_at')} FROM {self.t}"
            f" WHERE dead_at IS NOT NULL ORDER BY dead_at, {self.c_id} LIMIT :limit"
        )
        with self.engine.connect() as conn:
            rows = conn.execute(text(sql), {"limit": limit}).all()
        return [DeadRow(int(r[0]), int(r[1]), r[2], float(r[3] or 0.0)) for r in rows]

    def _count_dead_statement(self) -> TextClause:
        return self._statement(f"SELECT COUNT(*) FROM {self.t} WHERE {self.dead}")

    def count_dead(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(self._count_dead_statement()).scalar_one())

    def requeue_dead(self, ids: Sequence[int] | None) -> int:
        """Give dead rows a fresh start (all of them when ids is None)."""
        reset = (
            f"UPDATE {self.t} SET dead_at = NULL, attempts = 0, next_attempt_at = NULL,"
            f" lease_owner = NULL, lease_until = NULL WHERE dead_at IS NOT NULL"
        )
        if ids is None:
            with self.engine.begin() as conn:
                return conn.execute(text(reset)).rowcount
        return self._execute_for_ids(f"{reset} AND {self._ids_clause()}", ids, {})

    def purge_dead(self, older_than_seconds: float) -> int:
        sql = (
            f"DELETE FROM {self.t} WHERE dead_at IS NOT NULL"
            f" AND {self._age_seconds('dead_at')} >= :age"
        )
        with self.engine.begin() as conn:
            return conn.execute(text(sql), {"age": older_than_seconds}).rowcount

    def backlog_stats(self, shard_count: int) -> BacklogStats:
        """Backlog per shard, the age of the oldest pending row, and dead rows: each query is
        answered from a partial index, so this stays cheap as processed rows pile up."""
        pending = self.pending
        shard = self.shard_expr("n")
        by_shard_sql = self._statement(
            f"SELECT {shard}, COUNT(*) FROM {self.t} WHERE {pending} GROUP BY {shard}"
        )
        # Lowest id first: rows are inserted in id order, so this is the oldest waiting row.
        oldest_sql = self._statement(
            f"SELECT {self._timestamp_age()} FROM {self.t} WHERE {pending} ORDER BY {self.c_id} LIMIT 1"
        )
        dead_sql = self._count_dead_statement()

        def read(conn: Connection) -> BacklogStats:
            by_shard = {int(shard): int(count)
                        for shard, count in conn.execute(by_shard_sql, {"n": shard_count}).all()}
            oldest = conn.execute(oldest_sql).scalar()
            # An unreadable timestamp gives no age: the lag is unknown, not an error.
            readable = oldest is not None and math.isfinite(float(oldest))
            return BacklogStats(
                backlog=sum(by_shard.values()),
                oldest_age_seconds=max(0.0, float(oldest)) if readable else None,
                dead=int(conn.execute(dead_sql).scalar_one()),
                by_shard={shard: by_shard.get(shard, 0) for shard in range(shard_count)},
            )

        return self._one_statement(read)

    # --- retention -------------------------------------------------------------------
    def _prunable_where(self) -> str:
        ts = self.q(self.settings.columns.timestamp)
        # A NULL timestamp gives no age, so the row is kept; the comparison alone would skip it,
        # IS NOT NULL says so outright. Dead rows are never processed, and dead_at IS NULL keeps
        # them out even if one were: `pool dead purge` is what deletes them.
        return (
            f"{self.c_processed} = 1 AND dead_at IS NULL AND {ts} IS NOT NULL"
            f" AND {self._timestamp_older_than('age')}"
        )

    def prune_processed(self, older_than_seconds: float, batch_rows: int) -> int:
        """Delete at most `batch_rows` processed rows whose timestamp is at least
        `older_than_seconds` old by the database clock. Returns how many it deleted.

        One short transaction per call, so that pollers wait on none of it for long; a caller
        deletes a big backlog by calling again until a call deletes fewer than `batch_rows`."""
        _check_prune_arguments(older_than_seconds, batch_rows)
        sql = (
            f"DELETE FROM {self.t} WHERE {self.c_id} IN ("
            f"SELECT {self.c_id} FROM {self.t} WHERE {self._prunable_where()}"
            f" LIMIT :limit{self._skip_locked()})"
        )
        with self.engine.begin() as conn:
            self._times_as_utc(conn)
            return conn.execute(text(sql), {"age": older_than_seconds, "limit": batch_rows}).rowcount

    def count_prunable(self, older_than_seconds: float) -> int:
        """How many rows prune_processed would delete now, counted exactly. It scans every
        processed row of the table (the relay adds no index on the timestamp), so call it once per
        run rather than per batch."""
        _check_prune_arguments(older_than_seconds, 1)
        sql = f"SELECT COUNT(*) FROM {self.t} WHERE {self._prunable_where()}"
        with self.engine.begin() as conn:
            self._times_as_utc(conn)
            return int(conn.execute(text(sql), {"age": older_than_seconds}).scalar_one())

    def counts(self) -> Counts:
        p = self.c_processed
        sql = (
            f"SELECT COALESCE(SUM(CASE WHEN {p} = 1 THEN 1 ELSE 0 END), 0),"
            f" COALESCE(SUM(CASE WHEN {self.pending} THEN 1 ELSE 0 END), 0),"
            f" COALESCE(SUM(CASE WHEN {self.dead} THEN 1 ELSE 0 END), 0) FROM {self.t}"
        )
        with self.engine.connect() as conn:
            processed, unprocessed, dead = conn.execute(text(sql)).one()
        return Counts(processed=int(processed), unprocessed=int(unprocessed), dead=int(dead))

    def db_now(self) -> datetime | str:
        with self.engine.connect() as conn:
            return conn.execute(text(f"SELECT {self._now()}")).scalar_one()

    def check_schema(self) -> None:
        """Fail with a ConfigError naming what is missing, before any poller starts."""
        names.check_table_name(self.settings.table)
        try:
            with self.engine.connect() as conn:
                existing = self._existing_columns(conn)
                missing_shard_tables = self._missing_shard_tables(conn) if existing else []
        except (DBAPIError, NoSuchTableError) as exc:
            raise ConfigError(
                f"cannot reach database {redact_url(self.settings.db_url)}: {first_line(exc)}"
            ) from None
        if existing is None:
            raise ConfigError(
                f"table {self.settings.table!r} not found in {redact_url(self.settings.db_url)};"
                " run `pool init-db` first"
            )
        # Before the missing columns: `pool init-db` cannot help with this one.
        with self.engine.connect() as conn:
            self._check_column_types(conn)
        needed = [*vars(self.settings.columns).values(), *RELAY_COLUMNS]
        missing = [c for c in needed if c not in existing]
        if missing:
            raise ConfigError(
                f"table {self.settings.table!r} lacks column(s) {', '.join(missing)};"
                " run `pool init-db` to add the relay's columns"
            )
        if missing_shard_tables:
            raise ConfigError(
                f"table(s) {', '.join(missing_shard_tables)} for shard leases not found;"
                " run `pool init-db` to create them"
            )

    def close(self) -> None:
        with self._kept_lock:
            self._drop_kept()
        self.engine.dispose()


def _check_prune_arguments(older_than_seconds: float, batch_rows: int) -> None:
    # SQLite reads a negative LIMIT as no limit at all, and NaN ages compare as nothing.
    if not 0 <= older_than_seconds < float("inf"):
        raise ValueError(f"older_than_seconds must be a finite number >= 0, got {older_than_seconds!r}")
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be at least 1, got {batch_rows!r}")


def first_line(exc: BaseException) -> str:
    """A driver error's first line, which names the problem without SQL or parameters."""
    inner = getattr(exc, "orig", None) or exc
    lines = str(inner).strip().splitlines()
    return lines[0] if lines else type(inner).__name__
