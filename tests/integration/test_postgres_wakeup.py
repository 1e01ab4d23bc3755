"""PostgreSQL specifics: NOTIFY wakes idle pollers, the claim stays index-driven, storage settings."""

from __future__ import annotations

import threading

import psycopg
from sqlalchemy import text

from pool.poller import FixedShards, Poller, PollerIdentity, StopSignal
from pool.publisher import create_publisher
from pool.seeding import generate_signals
from pool.store import open_store
from tests.helpers import make_settings, wait_until


class RunningPoller:
    """A real poller on its own thread, claiming only `shards` of `shard_count`."""

    def __init__(self, settings, store, shards: list[int], shard_count: int, name: str) -> None:
        self.publisher = create_publisher(settings)
        self.stop = StopSignal()
        self.poller = Poller(store, self.publisher, PollerIdentity(name, 0, shard_count), settings, self.stop,
                             shards=FixedShards(shard_count, shards))
        self.idle = threading.Event()  # set once the poller rests after an empty claim
        self.idle_rest = 0.0  # how long that rest was to last
        original = self.poller._idle

        def note_idle(seconds: float) -> bool:
            if self.poller._last_claimed == 0:
                self.idle_rest = seconds
                self.idle.set()
            return original(seconds)

        self.poller._idle = note_idle
        self.thread = threading.Thread(target=self.poller.run)
        self.thread.start()

    def close(self) -> None:
        self.stop.request()
        self.thread.join(timeout=30)
        self.poller.close()
        self.publisher.close()


def processed_ids(store) -> set[int]:
    with store.engine.connect() as conn:
        return set(conn.execute(text("SELECT id FROM signals WHERE processed = 1")).scalars())


def test_an_insert_wakes_an_idle_poller_long_before_its_poll_interval(pg_url, redis_url, queue_name):
    # Both intervals 60 s: the first empty claim already starts a rest of 30-60 s (jittered), so
    # busy polling cannot find the rows in time; only the trigger's NOTIFY can.
    settings = make_settings(db_url=pg_url, broker_url=redis_url, queue=queue_name, poll_interval="60",
                             busy_poll_interval="60")
    store = open_store(settings)
    store.init_schema(notify=True)
    running = RunningPoller(settings, store, [0], 1, "t")
    try:
        assert running.idle.wait(30), "the poller never went idle"
        assert running.idle_rest >= 30
        # A producer's plain INSERT on a connection of its own, not the relay's COPY.
        with psycopg.connect(pg_url, autocommit=True) as producer:
            producer.execute("INSERT INTO signals (name, value, source) VALUES ('a', 1, 's'), ('b', 2, 's')")
            producer.execute("INSERT INTO signals (name, value, source) VALUES ('c', 3, 's')")
        wait_until(lambda: store.counts().processed == 3, timeout=10, interval=0.05,
                   message="the insert trigger's NOTIFY to wake the poller")
    finally:
        running.close()
        store.close()


def test_a_poller_that_finds_rows_after_an_idle_spell_wakes_the_others(pg_url, redis_url, queue_name):
    # No insert trigger. The sleeper rests 60 s between empty claims, so only the scout's NOTIFY,
    # sent when it finds rows after its own (short) idle spell, can get the sleeper's rows out in time.
    base = {"db_url": pg_url, "broker_url": redis_url, "queue": queue_name}
    store = open_store(make_settings(**base))
    store.init_schema()
    scout = RunningPoller(make_settings(**base, poll_interval="0.2", busy_poll_interval="0.2"), store,
                          [0], 2, "scout")
    sleeper = RunningPoller(make_settings(**base, poll_interval="60", busy_poll_interval="60"), store,
                            [1], 2, "sleeper")
    try:
        assert scout.idle.wait(30) and sleeper.idle.wait(30), "the pollers never went idle"
        store.insert_signals(list(generate_signals(6, seed=11)))  # ids 1..6: both shards
        wait_until(lambda: processed_ids(store) == {1, 2, 3, 4, 5, 6}, timeout=15, interval=0.05,
                   message="the scout's NOTIFY to wake the sleeper")
    finally:
        scout.close()
        sleeper.close()
        store.close()


def test_wake_peers_ends_the_other_listeners_waits_but_not_its_own(pg_url):
    store = open_store(make_settings(db_url=pg_url))
    store.init_schema()
    sender, other = store.wake_listener(), store.wake_listener()
    try:
        sender.listen()
        other.listen()
        sender.wake_peers()
        assert other.wait(10, lambda: False) is True
        assert sender.wait(0.5, lambda: False) is False
    finally:
        sender.close()
        other.close()
        store.close()


def test_claim_stays_index_driven_as_processed_rows_pile_up(pg_url):
    store = open_store(make_settings(db_url=pg_url))
    store.init_schema()
    store.insert_signals(list(generate_signals(20_000, seed=10)))
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE signals SET processed = 1 WHERE id <= 19900"))
        conn.execute(text("ANALYZE signals"))

    def scans(plan: dict) -> list[tuple[str, str | None]]:
        found = [(plan["Node Type"], plan.get("Index Name"))]
        for child in plan.get("Plans", []):
            found += scans(child)
        return found

    nodes = scans(store.explain_claim(8, 3, 500))
    assert ("Index Scan", "signals_pool_pending") in nodes, nodes
    assert not [n for n in nodes if n[0] == "Seq Scan"], nodes
    store.close()


def notify_triggers(store) -> list[tuple[str, str, str]]:
    """(trigger, enabled, function) of each user trigger that fires after an INSERT statement on
    signals and calls a function that sends pg_notify."""
    with store.engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT t.tgname, t.tgenabled, p.proname FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid"
            " WHERE t.tgrelid = 'signals'::regclass AND NOT t.tgisinternal"
            # tgtype bits: 4 = INSERT; 1 (ROW) and 2 (BEFORE) clear: AFTER ... FOR EACH STATEMENT.
            " AND t.tgtype & 7 = 4 AND p.prosrc LIKE '%pg_notify%'"
        ))
        return [tuple(r) for r in rows]


def test_init_db_applies_storage_settings_and_the_opt_in_notify_trigger_once(pg_url):
    store = open_store(make_settings(db_url=pg_url))
    first = store.init_schema()
    assert not any("trigger" in e for e in first.created_extras)  # opt-in
    assert any("fillfactor = 90" in e for e in first.created_extras)
    assert not store.init_schema().changed
    assert notify_triggers(store) == []
    with_trigger = store.init_schema(notify=True)
    assert any("trigger signals_pool_notify" in e for e in with_trigger.created_extras)
    assert not store.init_schema(notify=True).changed
    # In the catalog, not only in the report: one enabled trigger, after each insert statement.
    assert notify_triggers(store) == [("signals_pool_notify", "O", "signals_pool_notify")]
    with store.engine.connect() as conn:
        options = conn.execute(text("SELECT reloptions FROM pg_class WHERE oid = 'signals'::regclass"))
        assert "autovacuum_vacuum_scale_factor=0.02" in options.scalar_one()
    store.close()


def test_claim_walks_the_index_even_with_no_statistics_on_a_large_backlog(pg_url):
    # Autovacuum off, or a bulk load since the last ANALYZE: the planner knows nothing about
    # the table. Unpinned, it sorted the whole backlog for every claim (54 ms instead of 0.3 ms).
    store = open_store(make_settings(db_url=pg_url))
    store.init_schema()
    with store.engine.begin() as conn:
        conn.execute(text("INSERT INTO signals (name, value, source)"
                          " SELECT 'n', g, 's' FROM generate_series(1, 200000) AS g"))
        never_analyzed = text("SELECT reltuples < 0 FROM pg_class WHERE oid = 'signals'::regclass")
        assert conn.execute(never_analyzed).scalar()

    def nodes(plan: dict) -> list[str]:
        return [plan["Node Type"], *(n for child in plan.get("Plans", []) for n in nodes(child))]

    for shard in range(4):
        plan = nodes(store.explain_claim(4, shard, 500))
        assert "Index Scan" in plan and "Sort" not in plan, plan
    store.close()
