"""Shard leases and membership: how pollers on any number of hosts share one table.

Rows belong to shard `id % S`; S is fixed per table (recorded by `pool init-db`). Each poller
heartbeats a row in the members table and holds leases on shards (owner and expiry by the
database clock). The SQL lives here; who should hold what is decided in pool/shards.py.

A shard lease carries no fencing token. It decides which poller looks for which rows, not who
may write them: the row lease does that. Each claim stamps its rows with a fresh (owner, token)
and an expiry; no other claim takes a row while that lease holds, and ack, nack, release and
extend all require the token, so a poller that lost its shard (or stalled past its row lease)
changes nothing in rows another poller has claimed since. A shard token checked on those writes
would protect nothing more and would do harm: it would refuse the ack of rows the old holder
still leases and has already published, and they would be published a second time. Nor can a
token fence the publish itself: the broker knows none. Shard tables made by earlier versions
keep a `token` column, which nothing reads or writes any more.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Connection

from pool.errors import ConfigError

# A shard row with no holder.
FREE = "owner = NULL, expires_at = NULL"


@dataclass(frozen=True)
class Member:
    member: str  # "<host id>/poller-<slot>/<nonce>": one per process (pool/shards.py)
    host: str
    pid: int | None
    heartbeat_age_seconds: float
    live: bool


@dataclass(frozen=True)
class ShardOwner:
    shard: int
    owner: str | None  # None: free, or its lease ran out
    expires_in_seconds: float | None


class ShardLeaseTables:
    """Mixed into SqlStore: it provides engine, quoting, the clock expressions and _one_statement."""

    engine: Any
    settings: Any
    q: Any
    derived_name: Any

    # --- names and schema ------------------------------------------------------------
    def shard_table_names(self) -> tuple[str, str, str]:
        """The meta, shards and members tables beside the signals table (unquoted)."""
        return tuple(self.derived_name(suffix) for suffix in ("pool_meta", "pool_shards", "pool_members"))

    def _shard_tables(self) -> tuple[str, str, str]:
        meta, shards, members = self.shard_table_names()
        return self.q(meta), self.q(shards), self.q(members)

    def _ensure_shard_tables(self, conn: Connection) -> tuple[str, ...]:
        """Create the meta, shards and members tables, recording the shard count once."""
        meta_name, shards_name, members_name = self.shard_table_names()
        meta, shards, members = self._shard_tables()
        time_type = self._time_type()
        created = []
        if not self._table_exists(conn, meta_name):
            conn.execute(text(f"CREATE TABLE {meta} (shard_count INTEGER NOT NULL)"))
            conn.execute(text(f"INSERT INTO {meta} (shard_count) VALUES (:n)"), {"n": self.settings.shards})
            count = self.settings.shards
            created.append(f"shard count {count} (rows belong to shard id % {count})")
        recorded = int(conn.execute(text(f"SELECT shard_count FROM {meta}")).scalar_one())
        if recorded != self.settings.shards:
            raise ConfigError(
                f"table {self.settings.table!r} is split into {recorded} shards for good;"
                f" PULSE_SHARDS={self.settings.shards} cannot change that (unset it)"
            )
        if not self._table_exists(conn, shards_name):
            conn.execute(text(f"CREATE TABLE {shards} (shard INTEGER PRIMARY KEY, owner TEXT,"
                              f" expires_at {time_type})"))
            conn.execute(text(f"INSERT INTO {shards} (shard) VALUES (:s)"),
                         [{"s": s} for s in range(recorded)])
            created.append(f"shard leases table {shards}")
        if not self._table_exists(conn, members_name):
            conn.execute(text(f"CREATE TABLE {members} (member TEXT PRIMARY KEY, host TEXT NOT NULL,"
                              f" pid INTEGER, started_at {time_type}, heartbeat_at {time_type})"))
            created.append(f"members table {members}")
        return tuple(created)

    def shard_count(self) -> int:
        meta, _shards, _members = self._shard_tables()
        statement = self._statement(f"SELECT shard_count FROM {meta}")
        return self._one_statement(lambda conn: int(conn.execute(statement).scalar_one()))

    def _missing_shard_tables(self, conn: Connection) -> list[str]:
        return [name for name in self.shard_table_names() if not self._table_exists(conn, name)]

    # --- membership --------------------------------------------------------------------
    def member_heartbeat(self, member: str, host: str, pid: int, ttl: float) -> list[str]:
        """Say `member` is alive; forget members silent for 3 ttl; return the live ones, sorted."""
        _meta, _shards, members = self._shard_tables()
        now = self._now()
        upsert = self._statement(
            f"INSERT INTO {members} (member, host, pid, started_at, heartbeat_at)"
            f" VALUES (:member, :host, :pid, {now}, {now})"
            # Each process has a name of its own, so a conflict is this process beating again.
            f" ON CONFLICT (member) DO UPDATE SET heartbeat_at = excluded.heartbeat_at"
        )
        # Members silent for 3 ttl are gone. So is, after one ttl, an earlier process of this
        # member's own host and slot (a poller or a whole host killed and started again): its
        # shard leases have expired, and a ghost of it would linger in status for 3 ttl, or for
        # good once every poller has stopped. A twin that still beats (a duplicate host id) stays.
        forget = self._statement(
            f"DELETE FROM {members} WHERE heartbeat_at < {self._minus_seconds('stale')}"
            f" OR (substr(member, 1, :slot_length) = :slot_prefix AND member <> :member"
            f" AND heartbeat_at < {self._minus_seconds('ttl')})"
        )
        live = self._statement(
            f"SELECT member FROM {members} WHERE heartbeat_at >= {self._minus_seconds('ttl')} ORDER BY member"
        )

        def beat(conn: Connection) -> list[str]:
            conn.execute(upsert, {"member": member, "host": host, "pid": pid})
            parts = member.split("/")  # "<host id>/<slot>/<nonce>"
            slot_prefix = "/".join(parts[:2]) + "/" if len(parts) == 3 else member + "/"
            conn.execute(forget, {"stale": 3 * ttl, "ttl": ttl, "member": member,
                                  "slot_prefix": slot_prefix, "slot_length": len(slot_prefix)})
            return [r[0] for r in conn.execute(live, {"ttl": ttl})]

        return self._one_statement(beat)

    def sync_shards(self, member: str, desired: Sequence[int], ttl: float) -> list[int]:
        """Release held shards not in `desired`, renew or take the desired ones that are ours,
        free or expired, and return what `member` holds now. One transaction."""
        _meta, shards, _members = self._shard_tables()
        now = self._now()
        desired = sorted(set(desired))
        release = self._statement(
            f"UPDATE {shards} SET {FREE} WHERE owner = :member AND shard NOT IN :desired",
            expanding=("desired",))
        release_all = self._release_all_statement()
        take = self._statement(
            f"UPDATE {shards} SET owner = :member, expires_at = {self._plus_seconds('ttl')}"
            f" WHERE shard IN :desired AND (owner = :member OR owner IS NULL OR expires_at < {now})",
            expanding=("desired",))
        held = self._statement(f"SELECT shard FROM {shards} WHERE owner = :member ORDER BY shard")

        def sync(conn: Connection) -> list[int]:
            if desired:
                conn.execute(release, {"member": member, "desired": desired})
                conn.execute(take, {"member": member, "desired": desired, "ttl": ttl})
            else:
                conn.execute(release_all, {"member": member})
            return [int(r[0]) for r in conn.execute(held, {"member": member})]

        return self._one_transaction(sync)

    def leave(self, member: str) -> None:
        """A graceful stop: give the shards back at once and drop the membership."""
        _meta, _shards, members = self._shard_tables()
        release = self._release_all_statement()
        forget = self._statement(f"DELETE FROM {members} WHERE member = :member")

        def go(conn: Connection) -> None:
            conn.execute(release, {"member": member})
            conn.execute(forget, {"member": member})

        self._one_transaction(go)

    # --- what status shows -----------------------------------------------------------
    def cluster(self, ttl: float) -> tuple[list[Member], list[ShardOwner]]:
        """Every known member with its heartbeat age, and every shard with its live owner."""
        _meta, shards, members = self._shard_tables()
        now = self._now()
        member_sql = self._statement(
            f"SELECT member, host, pid, {self._age_seconds('heartbeat_at')} FROM {members} ORDER BY member")
        owner_sql = self._statement(
            f"SELECT shard, CASE WHEN expires_at >= {now} THEN owner END,"
            f" CASE WHEN expires_at >= {now} THEN -({self._age_seconds('expires_at')}) END"
            f" FROM {shards} ORDER BY shard")

        def read(conn: Connection) -> tuple[list[Member], list[ShardOwner]]:
            found = [Member(r[0], r[1], r[2], max(0.0, float(r[3] or 0.0)), float(r[3] or 0.0) <= ttl)
                     for r in conn.execute(member_sql)]
            owners = [ShardOwner(int(r[0]), r[1], None if r[2] is None else float(r[2]))
                      for r in conn.execute(owner_sql)]
            return found, owners

        return self._one_statement(read)

    # --- helpers ---------------------------------------------------------------------
    def _release_all_statement(self) -> Any:
        _meta, shards, _members = self._shard_tables()
        return self._statement(f"UPDATE {shards} SET {FREE} WHERE owner = :member")

    def _one_transaction(self, work: Any) -> Any:
        # On PostgreSQL the kept connection runs each statement on its own; the shard sync
        # must see and change the shard rows as one.
        with self.engine.begin() as conn:
            return work(conn)
