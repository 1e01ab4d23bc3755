"""PostgreSQL specifics: NOTIFY wakes idle pollers, the claim stays index-driven, storage settings."""

from __future__ import annotations

import threading

from sqlalchemy import text

from pool.poller import Poller, PollerIdentity, StopSignal
from pool.publisher import create_publisher
from pool.seeding import generate_signals
from pool.store import open_store
from tests.helpers import make_settings, wait_until


def test_an_insert_wakes_an_idle_poller_long_before_its_poll_interval(pg_url, redis_url, queue_name):
    settings = make_settings(db_url=pg_url, broker_url=redis_url, queue=queue_name, poll_interval="60")
    store = open_store(settings)
    store.init_schema(notify=True)
    publisher = create_publisher(settings)
    stop = StopSignal()
    poller = Poller(store, publisher, PollerIdentity("t", 0, 1), settings, stop)
    idle = threading.Event()
    original = poller._idle

    def note_idle(seconds: float) -> None:
        idle.set()
        original(seconds)

    poller._idle = note_idle
    runner = threading.Thread(target=poller.run)
    runner.start()
    try:
        assert idle.wait(30), "the poller never went idle"
        store.insert_signals(list(generate_signals(3, seed=9)))
        # With a 60 s poll interval only the trigger's NOTIFY can make this happen in time.
        wait_until(lambda: store.counts().processed == 3, timeout=15, interval=0.05,
                   message="the NOTIFY to wake the poller")
    finally:
        stop.request()
        runner.join(timeout=30)
        poller.close()
        publisher.close()
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


def test_init_db_applies_storage_settings_and_the_opt_in_notify_trigger_once(pg_url):
    store = open_store(make_settings(db_url=pg_url))
    first = store.init_schema()
    assert not any("trigger" in e for e in first.created_extras)  # opt-in
    assert any("fillfactor = 90" in e for e in first.created_extras)
    assert not store.init_schema().changed
    with_trigger = store.init_schema(notify=True)
    assert any("trigger signals_pool_notify" in e for e in with_trigger.created_extras)
    assert not store.init_schema(notify=True).changed
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
