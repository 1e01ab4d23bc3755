"""The only place SQL runs. `open_store` picks the implementation from the database URL."""

from __future__ import annotations

from sqlalchemy import create_engine
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError

from pool.config import Settings
from pool.errors import ConfigError
from pool.redact import redact_url
from pool.store.base import Claim, ClaimedRow, Counts, Lease, SchemaChanges, SqlStore, Unreadable
from pool.store.postgres import PostgresStore, configure_postgres_engine
from pool.store.sqlite import SqliteStore, configure_sqlite_engine

__all__ = [
    "Claim", "ClaimedRow", "Counts", "Lease", "SchemaChanges", "SqlStore", "Unreadable",
    "create_db_engine", "open_store",
]


def create_db_engine(db_url: str, pool_size: int = 2) -> Engine:
    """An engine for `db_url`; plain postgresql:// URLs get the psycopg 3 driver."""
    try:
        url = make_url(db_url)
    except ArgumentError:
        raise ConfigError(f"PULSE_DB_URL is not a valid database URL: {redact_url(db_url)}") from None
    backend = url.get_backend_name()
    if backend in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")
        # No pre-ping: it costs a round trip per statement; the store replaces a connection
        # found dead instead (SqlStore._one_statement).
        # UTF-8 whatever PGCLIENTENCODING says: the server cannot send a row holding a character the
        # client encoding lacks, and every claim of that row's shard would fail, rolled back, forever.
        engine = create_engine(url, pool_size=pool_size, max_overflow=2,
                               connect_args={"connect_timeout": 10, "client_encoding": "UTF8"})
        configure_postgres_engine(engine)
        return engine
    if backend == "sqlite":
        if url.database in (None, "", ":memory:"):
            raise ConfigError("PULSE_DB_URL must name an SQLite file; pollers are separate processes")
        engine = create_engine(url, connect_args={"timeout": 30})
        configure_sqlite_engine(engine)
        return engine
    raise ConfigError(f"PULSE_DB_URL: unsupported database {backend!r} (use postgresql or sqlite)")


def open_store(settings: Settings, pool_size: int = 2) -> SqlStore:
    """A Store for the configured database. Create it after fork, in the process that uses it."""
    engine = create_db_engine(settings.db_url, pool_size=pool_size)
    if engine.dialect.name == "postgresql":
        return PostgresStore(engine, settings)
    return SqliteStore(engine, settings)
