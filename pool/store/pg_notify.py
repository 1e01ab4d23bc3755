"""LISTEN for the insert trigger's NOTIFY, so an idle poller claims new rows at once."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable

import psycopg
from psycopg import sql

log = logging.getLogger(__name__)

# Longest block inside psycopg before checking the stop flag again.
SLICE_SECONDS = 0.2
CHANNEL_OID_SQL = "SELECT to_regclass(%s)::oid"


def notify_channel(table_oid: int) -> str:
    # Keyed by the table's oid: tables of the same name in other schemas get their own channel.
    return f"pool_new_{table_oid}"


class PgNotifyListener:
    """A dedicated autocommit connection that LISTENs on one channel; reconnects lazily."""

    def __init__(self, conninfo: str, quoted_table: str) -> None:
        self.conninfo = conninfo
        self.quoted_table = quoted_table
        self._conn: psycopg.Connection | None = None
        self._channel = ""

    def _connect(self) -> psycopg.Connection:
        # Connects lazily, so a database that is down when a poller starts does not stop it.
        if self._conn is None or self._conn.closed:
            conn = psycopg.connect(self.conninfo, autocommit=True, connect_timeout=5)
            oid = conn.execute(CHANNEL_OID_SQL, (self.quoted_table,)).fetchone()[0]
            self._channel = notify_channel(oid)
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self._channel)))
            self._conn = conn
        return self._conn

    def listen(self) -> None:
        """LISTEN now, before the first claim, so no insert after that claim goes unnoticed."""
        try:
            self._connect()
        except Exception as exc:  # noqa: BLE001 - polling goes on without it; a dead waker must not stop it
            log.debug("notify listener could not connect yet: %s", type(exc).__name__)

    def wait(self, seconds: float, stop: Callable[[], bool]) -> bool:
        deadline = time.monotonic() + seconds
        while not stop():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                conn = self._connect()
                # Our own wake_peers() comes back to us too; it is not a reason to wake.
                woken = [n for n in conn.notifies(timeout=min(remaining, SLICE_SECONDS), stop_after=1)
                         if n.pid != conn.info.backend_pid]
                if woken:
                    # Coalesce: one claim serves every insert that arrived meanwhile. (The
                    # generator above must be finished first: it holds the connection's lock.)
                    for _ in conn.notifies(timeout=0.001):
                        pass
                    return True
            except Exception as exc:  # noqa: BLE001 - polling goes on without it; a dead waker must not stop it
                # Polling still guarantees progress; the next wait reconnects.
                log.debug("notify listener lost its connection: %s", type(exc).__name__)
                self.close()
                time.sleep(min(max(remaining, 0), SLICE_SECONDS))
        return False

    def wake_peers(self) -> None:
        """NOTIFY the channel the insert trigger uses: every poller of this table, on any host,
        ends its rest. It is sent rarely (see Poller), so the lock PostgreSQL takes at the
        commit of a NOTIFY costs nothing that matters."""
        try:
            self._connect().execute("SELECT pg_notify(%s, '')", (self._channel,))
        except Exception as exc:  # noqa: BLE001 - polling goes on without it; a dead waker must not stop it
            # The others still find the rows on their own timers.
            log.debug("could not wake the other pollers: %s", type(exc).__name__)
            self.close()

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()
