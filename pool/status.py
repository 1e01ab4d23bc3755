"""What the coordinator knows about the pool, refreshed on an interval.

One thread reads the database (backlog, lag, dead rows, per-shard backlog), the broker (queue
depth) and the pollers' own metric files (heartbeat, settings, totals) every `interval`
seconds, so that neither a scrape nor a status page costs the database anything, and no
poller counts the backlog per batch.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from pool.config import Settings
from pool.redact import redact_text
from pool.shards import SYNC_EVERY, host_id, member_slot
from pool.store.base import BacklogStats, DeadRow, first_line
from pool.store.shards import Member, ShardOwner

log = logging.getLogger(__name__)

HISTORY_SECONDS = 15 * 60
DEAD_LETTERS_SHOWN = 20
# Totals shown by `pool status` and the status page: counter name -> short name.
TOTALS = {
    "pool_signals_claimed_total": "claimed",
    "pool_signals_published_total": "published",
    "pool_signals_acked_total": "acked",
    "pool_signals_retried_total": "retried",
    "pool_signals_dead_total": "dead",
    "pool_signals_reclaimed_total": "reclaimed",
    "pool_publish_errors_total": "publish_errors",
    "pool_database_errors_total": "database_errors",
    "pool_backpressure_pauses_total": "backpressure_pauses",
}
# A live poller heartbeats its membership at least every SYNC_EVERY seconds.
DUPLICATE_HEARTBEAT_SECONDS = 3 * SYNC_EVERY
POLLER_GAUGES = {
    "pool_poller_heartbeat_timestamp_seconds": "heartbeat",
    "pool_poller_start_time_seconds": "started_at",
    "pool_poller_pid": "pid",
    "pool_poller_batch_size": "batch_size",
    "pool_poller_poll_interval_seconds": "poll_interval",
    "pool_backpressure_paused": "paused",
}


class StatusStore(Protocol):
    def shard_count(self) -> int: ...

    def backlog_stats(self, shard_count: int) -> BacklogStats: ...

    def cluster(self, ttl: float) -> tuple[list[Member], list[ShardOwner]]: ...

    def list_dead(self, limit: int = 100) -> list[DeadRow]: ...


class DepthProbe(Protocol):
    def depth(self) -> int | None: ...


Sample = tuple[str, dict[str, str], float]  # metric sample name, labels, value


@dataclass
class PollerStatus:
    worker: int
    shards: list[int]
    live: bool
    pid: int | None = None
    heartbeat_age_seconds: float | None = None
    started_at: float | None = None
    rows_per_second: float = 0.0
    batch_size: int | None = None
    poll_interval: float | None = None
    paused: bool = False
    acked: float = 0.0

    @property
    def state(self) -> str:
        """running, paused (backpressure), stalled (no loop for too long) or down (no process)."""
        if self.heartbeat_age_seconds is None:
            return "down"
        if not self.live:
            return "stalled"
        return "paused" if self.paused else "running"


@dataclass
class Snapshot:
    refreshed_at: float = 0.0
    interval: float = 0.0
    database_ok: bool = False
    database_error: str | None = None
    broker_ok: bool = False
    broker_error: str | None = None
    queue: str = ""
    queue_depth: int | None = None
    backlog: int | None = None
    lag_seconds: float | None = None
    dead: int | None = None
    shards: dict[int, int] = field(default_factory=dict)
    shard_owners: dict[int, str | None] = field(default_factory=dict)
    members: list[Member] = field(default_factory=list)
    host: str = ""
    pollers: list[PollerStatus] = field(default_factory=list)
    pollers_expected: int = 0
    totals: dict[str, float] = field(default_factory=dict)
    rows_per_second: float = 0.0
    dead_letters: list[DeadRow] = field(default_factory=list)
    history: list[dict[str, float | None]] = field(default_factory=list)

    @property
    def pollers_live(self) -> int:
        return sum(p.live for p in self.pollers)

    def duplicates(self) -> list[dict[str, Any]]:
        """Slots that more than one live process claims under one host id: two containers with
        one hostname, or two `pool start` given the same PULSE_HOST_ID. Each process is a
        member of its own and relays its share, but the host id no longer says which is which."""
        # A member killed without a successor beats no more; past a few missed syncs it is a
        # ghost waiting for its lease to run out, not a second process.
        recent = DUPLICATE_HEARTBEAT_SECONDS
        claimed: dict[tuple[str, str], list[Member]] = {}
        for m in self.members:
            if m.live and m.heartbeat_age_seconds <= recent:
                claimed.setdefault((m.host, member_slot(m.member)), []).append(m)
        return [{"host": host, "slot": slot, "processes": len(found),
                  "pids": [m.pid for m in found], "members": [m.member for m in found]}
                for (host, slot), found in sorted(claimed.items()) if len(found) > 1]

    def host_pollers_live(self) -> int:
        """Live pollers under this coordinator's host id, from every process that heartbeats it."""
        return sum(1 for m in self.members if m.live and m.host == self.host)

    def hosts(self) -> list[dict[str, Any]]:
        """Every host with live pollers on this table: its pollers and how many shards they hold."""
        held: dict[str, int] = {}
        for owner in self.shard_owners.values():
            if owner:
                held[owner] = held.get(owner, 0) + 1
        hosts: dict[str, dict[str, Any]] = {}
        for m in self.members:
            if m.live:
                entry = hosts.setdefault(m.host, {"host": m.host, "pollers": 0, "shards": 0})
                entry["pollers"] += 1
                entry["shards"] += held.get(m.member, 0)
        return [hosts[h] for h in sorted(hosts)]

    def problems(self) -> list[str]:
        """Why the pool is not healthy; empty when it is."""
        if not self.refreshed_at:
            return ["no status yet"]
        found = []
        if not self.database_ok:
            found.append(f"database unreachable: {self.database_error}")
        if not self.broker_ok:
            found.append(f"broker unreachable: {self.broker_error}")
        if self.pollers_live < self.pollers_expected:
            found.append(f"{self.pollers_live} of {self.pollers_expected} pollers live")
        found.extend(_duplicate_problems(self.duplicates()))
        return found

    def ready(self) -> bool:
        """Database and broker reachable and at least one poller live (for /readyz).

        A duplicate host id is a problem (unhealthy, in /readyz's body) but leaves this ready:
        every process still holds shards of its own and relays them, and taking the
        coordinators out of service would hide the status that names the clash."""
        return bool(self.refreshed_at) and self.database_ok and self.broker_ok and self.pollers_live > 0

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for poller, shown in zip(self.pollers, data["pollers"], strict=True):
            shown["state"] = poller.state
        data["shards"] = [{"shard": s, "backlog": n, "owner": self.shard_owners.get(s)}
                          for s, n in sorted(self.shards.items())]
        # Row ids as strings: JavaScript reads JSON numbers as doubles, exact only up to 2**53.
        for row in data["dead_letters"]:
            row["id"] = str(row["id"])
        data["hosts"] = self.hosts()
        data["pollers_live"] = self.pollers_live
        data["host_pollers_live"] = self.host_pollers_live()
        data["duplicates"] = self.duplicates()
        data["healthy"] = not self.problems()
        data["ready"] = self.ready()
        data["problems"] = self.problems()
        return data


def _duplicate_problems(duplicates: list[dict[str, Any]]) -> list[str]:
    """One line per host: "host web-1: 2 processes claim poller-0 (pids 11, 12), 2 claim …"."""
    by_host: dict[str, list[str]] = {}
    for d in duplicates:
        claims = by_host.setdefault(d["host"], [])
        pids = ", ".join(str(p) for p in d["pids"])
        noun = "" if claims else "processes "
        claims.append(f"{d['processes']} {noun}claim {d['slot']} (pids {pids})")
    return [f"host {host}: {', '.join(claims)}: more than one pool start or container runs under this"
            " host id; give each its own --host-id (PULSE_HOST_ID)"
            for host, claims in sorted(by_host.items())]


def read_samples(collect: Callable[[], Iterable[Any]]) -> list[Sample]:
    """Flatten prometheus_client metric families into (sample name, labels, value)."""
    return [(s.name, dict(s.labels), s.value) for family in collect() for s in family.samples]


def live_after(settings: Settings) -> float:
    """A poller whose last loop is older than this is stuck (a dead one has no heartbeat)."""
    return max(15.0, 3 * settings.poll_interval)


def build_pollers(samples: list[Sample], settings: Settings, now: float,
                  owners: dict[int, str | None] | None = None,
                  slot_member: Callable[[str], str | None] = lambda _slot: None) -> list[PollerStatus]:
    """This coordinator's pollers, from their metric files; `slot_member` names the member
    (in the members table) that runs a slot here, for the shards it holds."""
    by_member: dict[str, list[int]] = {}
    for shard, owner in sorted((owners or {}).items()):
        if owner:
            by_member.setdefault(owner, []).append(shard)
    by_worker: dict[int, dict[str, float]] = {}
    for name, labels, value in samples:
        worker = labels.get("worker")
        if worker is None or not worker.isdigit():
            continue
        fields = by_worker.setdefault(int(worker), {})
        if name in POLLER_GAUGES:
            fields[POLLER_GAUGES[name]] = value
        elif name == "pool_signals_acked_total":
            fields["acked"] = value
    pollers = []
    for worker in range(settings.workers):
        fields = by_worker.get(worker, {})
        heartbeat = fields.get("heartbeat")
        age = None if heartbeat is None else max(0.0, now - heartbeat)
        pollers.append(PollerStatus(
            worker=worker,
            shards=by_member.get(slot_member(f"poller-{worker}") or "", []),
            live=age is not None and age <= live_after(settings),
            pid=int(fields["pid"]) if "pid" in fields else None,
            heartbeat_age_seconds=age,
            started_at=fields.get("started_at"),
            batch_size=int(fields["batch_size"]) if "batch_size" in fields else None,
            poll_interval=fields.get("poll_interval"),
            paused=bool(fields.get("paused", 0)),
            acked=fields.get("acked", 0.0),
        ))
    return pollers


def sum_totals(samples: list[Sample]) -> dict[str, float]:
    totals = dict.fromkeys(TOTALS.values(), 0.0)
    for name, _labels, value in samples:
        if name in TOTALS:
            totals[TOTALS[name]] += value
    return totals


class StatusMonitor:
    """Refreshes a Snapshot every `interval` seconds in a thread of its own."""

    def __init__(self, settings: Settings, store: StatusStore, depth: DepthProbe,
                 collect: Callable[[], Iterable[Any]], interval: float = 5.0,
                 clock: Callable[[], float] = time.time,
                 slot_member: Callable[[str], str | None] = lambda _slot: None) -> None:
        self.settings = settings
        self.slot_member = slot_member
        self.store = store
        self.depth = depth
        self.collect = collect
        self.interval = interval
        self.clock = clock
        self.snapshot = Snapshot(interval=interval, queue=settings.queue, pollers_expected=settings.workers)
        self._history: deque[dict[str, float | None]] = deque(maxlen=int(HISTORY_SECONDS / interval) + 1)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._shard_count = 0
        self._failing = False

    def current(self) -> Snapshot:
        with self._lock:
            return self.snapshot

    def refresh(self) -> Snapshot:
        now = self.clock()
        previous = self.current()
        snap = Snapshot(refreshed_at=now, interval=self.interval, queue=self.settings.queue,
                        pollers_expected=self.settings.workers, host=host_id(self.settings.host_id))
        try:
            if not self._shard_count:
                self._shard_count = self.store.shard_count()  # fixed per table
            stats = self.store.backlog_stats(self._shard_count)
            snap.members, owners = self.store.cluster(self.settings.shard_lease_seconds)
            snap.shard_owners = {o.shard: o.owner for o in owners}
            snap.dead_letters = self.store.list_dead(DEAD_LETTERS_SHOWN)
            snap.database_ok = True
            snap.backlog, snap.lag_seconds, snap.dead = stats.backlog, stats.oldest_age_seconds, stats.dead
            snap.shards = stats.by_shard
        except Exception as exc:  # noqa: BLE001 - an outage is reported, not fatal
            snap.database_error = redact_text(first_line(exc), self.settings.db_url)
            if previous.database_ok or not previous.refreshed_at:
                log.warning("status: database unreachable: %s", snap.database_error)
        snap.queue_depth = self.depth.depth()
        snap.broker_ok = snap.queue_depth is not None
        if not snap.broker_ok:
            snap.broker_error = "cannot read the queue depth"
        try:
            samples = read_samples(self.collect)
        except Exception as exc:  # noqa: BLE001 - a damaged metrics file must not stop the status
            samples = []
            log.warning("status: cannot read the pollers' metric files: %s: %s", type(exc).__name__, exc)
        snap.totals = sum_totals(samples)
        snap.pollers = build_pollers(samples, self.settings, now, snap.shard_owners, self.slot_member)
        elapsed = now - previous.refreshed_at if previous.refreshed_at else 0.0
        if elapsed > 0:
            before = {p.worker: p.acked for p in previous.pollers}
            for poller in snap.pollers:
                # Counters survive restarts (the files are per worker slot), so a drop only
                # happens if the metrics directory was wiped: count that as no progress.
                done = poller.acked - before.get(poller.worker, poller.acked)
                poller.rows_per_second = max(0.0, done) / elapsed
            snap.rows_per_second = sum(p.rows_per_second for p in snap.pollers)
        self._history.append({"t": now, "rows_per_second": snap.rows_per_second, "backlog": snap.backlog,
                              "lag_seconds": snap.lag_seconds, "dead": snap.dead})
        snap.history = list(self._history)
        with self._lock:
            self.snapshot = snap
        return snap

    def start(self) -> None:
        self._refresh_safely()
        self._thread = threading.Thread(target=self._run, name="status-monitor", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._refresh_safely()

    def _refresh_safely(self) -> None:
        """The monitor must outlive any one bad refresh; a failure is logged when it starts."""
        try:
            self.refresh()
        except Exception as exc:  # noqa: BLE001
            if not self._failing:
                log.error("status refresh failed, the status page shows the last good one: %s: %s",
                          type(exc).__name__, first_line(exc))
            self._failing = True
        else:
            self._failing = False

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
