"""Which shards a poller works on: membership, near-equal shares, takeover and hand-over.

Every poller heartbeats its membership and then asks for its share: the live members, sorted,
split the S shards round robin (member i of M takes the shards s with s % M == i). A member
that joins or leaves changes everybody's share; each poller releases what is no longer its own
and takes what is, at a batch boundary, through leases in the database. A dead poller's shards
are free once its lease expires, unless a successor in its slot takes them over at once (a
restart). Every process is a member of its own, whatever host id and slot it was given. Row
leases stay the safety net while two pollers briefly disagree about a shard. No SQL here: the
store has it.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import socket
import time
from collections.abc import Callable, Sequence
from typing import Protocol

log = logging.getLogger(__name__)

# How often a poller renews its leases and looks at membership, at most: often enough that a
# joining poller gets its share within a second or two, cheap (a few statements per poller).
SYNC_EVERY = 1.0
# While shares are moving (a member came or went, or this poller waits for shards another
# still holds), it looks again this soon, so that pollers started together settle at once.
SYNC_WHILE_MOVING = 0.1


class ShardLeaseStore(Protocol):
    def shard_count(self) -> int: ...

    def member_heartbeat(self, member: str, host: str, pid: int, ttl: float) -> list[str]: ...

    def sync_shards(self, member: str, desired: Sequence[int], ttl: float) -> list[int]: ...

    def leave(self, member: str) -> None: ...


def host_id(configured: str) -> str:
    """PULSE_HOST_ID, or this machine's name made safe for member names."""
    return configured or re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:100] or "host"


def member_name(host: str, slot: str, nonce: str) -> str:
    """One poller process's name among the members: "<host id>/<slot>/<nonce>".

    The nonce is drawn afresh by every process, so two processes never share a name (and with it
    a heartbeat row and shard leases) even when they were given the same host id and slot: two
    containers with one hostname, two `pool start` with one PULSE_HOST_ID. Status spots those
    by the host and slot they share (see member_slot)."""
    return f"{host}/{slot}/{nonce}"


def new_nonce() -> str:
    return secrets.token_hex(4)


def member_slot(member: str) -> str:
    """The slot part of a member name ("poller-3"); the whole name if it has no slot part."""
    parts = member.split("/")
    return parts[1] if len(parts) >= 2 else member


def desired_shards(members: Sequence[str], me: str, shard_count: int) -> list[int]:
    """My share: live members sorted by name split the shards round robin."""
    ordered = sorted(set(members) | {me})
    position, count = ordered.index(me), len(ordered)
    return [shard for shard in range(shard_count) if shard % count == position]


class ShardKeeper:
    """Holds this poller's shard leases: renews them (every second, or ttl/3 if shorter; every
    0.1 s while shares move) and follows membership."""

    def __init__(self, store: ShardLeaseStore, host: str, slot: str, ttl: float,
                 clock: Callable[[], float] = time.monotonic, replaces: str | None = None) -> None:
        self.store = store
        self.host = host
        self.member = member_name(host, slot, new_nonce())
        # The member this process succeeds in its slot (a restart): its row and shards are
        # handed over at the first sync instead of waiting out its lease as a ghost.
        self.replaces = replaces if replaces != self.member else None
        self.ttl = ttl
        self.clock = clock
        self.shard_count = store.shard_count()
        self.held: list[int] = []
        self._valid_until = 0.0  # our leases surely hold until then (monotonic clock)
        self._next_sync = 0.0
        self._members_seen = 0

    def shards(self) -> list[int]:
        """The shards to claim from now; renews the leases when due (database errors propagate)."""
        if self.clock() >= self._next_sync:
            self.sync()
        return self.held if self.clock() < self._valid_until else []

    def sync(self) -> None:
        started = self.clock()
        # Retry soon if this fails, not only after a whole interval.
        self._next_sync = started + min(SYNC_EVERY, self.ttl / 3)
        if self.replaces:
            self.store.leave(self.replaces)
            log.info("took over from %s, this slot's previous process", self.replaces)
            self.replaces = None
        members = self.store.member_heartbeat(self.member, self.host, os.getpid(), self.ttl)
        desired = desired_shards(members, self.member, self.shard_count)
        held = self.store.sync_shards(self.member, desired, self.ttl)
        moving = held != desired or held != self.held or len(members) != self._members_seen
        self._members_seen = len(members)
        if held != self.held:
            log.info("holding %d of %d shards (%d pollers live): %s", len(held), self.shard_count,
                     len(set(members) | {self.member}), _listing(held),
                     extra={"fields": {"event": "shards_changed", "shards": len(held),
                                       "members": len(set(members) | {self.member})}})
        self.held = held
        self._valid_until = started + self.ttl
        self._next_sync = started + (SYNC_WHILE_MOVING if moving else min(self.ttl / 3, SYNC_EVERY))

    def leave(self) -> None:
        """Hand the shards back at once on a graceful stop, instead of letting them expire."""
        try:
            self.store.leave(self.member)
        except Exception as exc:  # noqa: BLE001 - the leases expire anyway
            log.warning("could not release shards on the way out (they expire in %.0f s): %s",
                        self.ttl, type(exc).__name__)
        self.held = []


def _listing(shards: Sequence[int]) -> str:
    return ", ".join(str(s) for s in shards[:16]) + (" …" if len(shards) > 16 else "") if shards else "none"
