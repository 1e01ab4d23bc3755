"""The coordinator's status: how pollers, totals and rates are read from metric samples, what
counts as healthy and ready, and the HTTP routes that serve them."""

from __future__ import annotations

import io
import json
from types import SimpleNamespace
from typing import Any

from pool.config import load_settings
from pool.coordinator import CoordinatorApp
from pool.status import StatusMonitor, build_pollers, sum_totals
from pool.status_client import StatusReport, coordinator_url
from pool.store.base import BacklogStats, Counts, DeadRow
from pool.store.shards import Member, ShardOwner

HOST = "here"


def settings(**overrides: Any):
    return load_settings(environ={}, overrides={"workers": 2, "host_id": HOST, **overrides})


def family(*samples: tuple[str, dict[str, str], float]) -> SimpleNamespace:
    return SimpleNamespace(samples=[SimpleNamespace(name=n, labels=labels, value=v)
                                    for n, labels, v in samples])


class FakeStore:
    def __init__(self) -> None:
        self.fail = False
        self.stats = BacklogStats(backlog=7, oldest_age_seconds=3.5, dead=1, by_shard={0: 3, 1: 4})
        self.members = [Member(f"{HOST}/poller-0/a1", HOST, 100, 1.0, True),
                        Member("other/poller-0/b2", "other", 7, 1.0, True),
                        Member("gone/poller-0/c3", "gone", 8, 99.0, False)]

    def shard_count(self) -> int:
        return 2

    def cluster(self, ttl: float) -> tuple[list[Member], list[ShardOwner]]:
        owners = [ShardOwner(0, f"{HOST}/poller-0/a1", 9.0), ShardOwner(1, "other/poller-0/b2", 9.0)]
        return self.members, owners

    def backlog_stats(self, shard_count: int) -> BacklogStats:
        assert shard_count == 2
        if self.fail:
            raise OSError("connection refused")
        return self.stats

    def list_dead(self, limit: int = 100) -> list[DeadRow]:
        return [DeadRow(id=9, attempts=5, last_error="name is NULL", age_seconds=12.0)]


class FakeDepth:
    def __init__(self, depth: int | None = 42) -> None:
        self.value = depth

    def depth(self) -> int | None:
        return self.value


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def poller_samples(now: float, acked: dict[str, float]) -> list[SimpleNamespace]:
    samples = []
    for worker, count in acked.items():
        samples += [
            ("pool_poller_heartbeat_timestamp_seconds", {"worker": worker}, now - 0.5),
            ("pool_poller_pid", {"worker": worker}, 100 + int(worker)),
            ("pool_poller_batch_size", {"worker": worker}, 500),
            ("pool_poller_poll_interval_seconds", {"worker": worker}, 1.0),
            ("pool_signals_acked_total", {"worker": worker}, count),
            ("pool_publish_errors_total", {"worker": worker, "reason": "unsent"}, 2),
        ]
    return [family(*samples)]


def test_pollers_come_from_their_metric_samples_and_a_missing_one_is_down() -> None:
    samples = [(s.name, s.labels, s.value) for f in poller_samples(1000.0, {"0": 10}) for s in f.samples]
    owners = {0: f"{HOST}/poller-0/a1", 1: "other/poller-0/b2", 2: f"{HOST}/poller-0/a1", 3: None}
    # The slot files in the metrics folder say which member runs each slot here.
    pollers = build_pollers(samples, settings(), now=1000.0, owners=owners,
                            slot_member={"poller-0": f"{HOST}/poller-0/a1"}.get)
    assert [(p.worker, p.live, p.pid, p.shards) for p in pollers] == [
        (0, True, 100, [0, 2]), (1, False, None, [])]
    assert pollers[0].heartbeat_age_seconds == 0.5 and pollers[0].batch_size == 500


def test_a_poller_whose_heartbeat_stopped_is_not_live() -> None:
    samples = [("pool_poller_heartbeat_timestamp_seconds", {"worker": "0"}, 900.0)]
    (stuck, gone) = build_pollers(samples, settings(), now=1000.0)
    assert not stuck.live and stuck.heartbeat_age_seconds == 100.0
    assert (stuck.state, gone.state) == ("stalled", "down")


def test_totals_add_up_over_workers_and_reasons() -> None:
    samples = [("pool_signals_acked_total", {"worker": "0"}, 5.0),
               ("pool_signals_acked_total", {"worker": "1"}, 6.0),
               ("pool_publish_errors_total", {"worker": "0", "reason": "unsent"}, 2.0),
               ("pool_publish_errors_total", {"worker": "0", "reason": "rejected"}, 1.0)]
    totals = sum_totals(samples)
    assert totals["acked"] == 11 and totals["publish_errors"] == 3 and totals["dead"] == 0


def test_refresh_computes_rates_from_counter_deltas_and_keeps_history() -> None:
    clock, store = Clock(), FakeStore()
    acked = {"0": 100.0, "1": 50.0}
    monitor = StatusMonitor(settings(), store, FakeDepth(), lambda: poller_samples(clock.now, acked),
                            interval=5.0, clock=clock)
    first = monitor.refresh()
    assert first.rows_per_second == 0.0  # nothing to compare with yet
    clock.now += 5.0
    acked.update({"0": 600.0, "1": 50.0})
    snap = monitor.refresh()
    assert [p.rows_per_second for p in snap.pollers] == [100.0, 0.0]
    assert snap.rows_per_second == 100.0
    assert (snap.backlog, snap.lag_seconds, snap.dead, snap.queue_depth) == (7, 3.5, 1, 42)
    assert [h["rows_per_second"] for h in snap.history] == [0.0, 100.0]
    assert snap.problems() == [] and snap.ready()
    data = snap.as_dict()
    assert data["healthy"] and data["pollers_live"] == 2
    assert data["shards"] == [{"shard": 0, "backlog": 3, "owner": f"{HOST}/poller-0/a1"},
                              {"shard": 1, "backlog": 4, "owner": "other/poller-0/b2"}]
    assert data["duplicates"] == [] and data["host_pollers_live"] == 1
    # Hosts come from the members table: only live ones, with the shards their pollers hold.
    assert data["hosts"] == [{"host": HOST, "pollers": 1, "shards": 1},
                             {"host": "other", "pollers": 1, "shards": 1}]
    assert data["dead_letters"][0]["last_error"] == "name is NULL"


def test_two_live_processes_in_one_slot_of_one_host_id_are_a_problem_named_by_host_and_slot() -> None:
    clock, store = Clock(), FakeStore()
    store.members = [Member(f"{HOST}/poller-0/a1", HOST, 100, 0.2, True),
                     Member(f"{HOST}/poller-0/d4", HOST, 100, 0.4, True),  # same pid, another container
                     Member(f"{HOST}/poller-1/e5", HOST, 101, 0.3, True),
                     Member(f"{HOST}/poller-1/f6", HOST, 201, 0.3, True),
                     # A killed process without a successor: a ghost until its lease ends, not a twin.
                     Member("other/poller-0/b2", "other", 7, 0.5, True),
                     Member("other/poller-0/g7", "other", 9, 7.5, True)]
    samples = poller_samples(clock.now, {"0": 1, "1": 1})
    monitor = StatusMonitor(settings(), store, FakeDepth(), lambda: samples, clock=clock)
    snap = monitor.refresh()
    assert snap.problems() == [
        f"host {HOST}: 2 processes claim poller-0 (pids 100, 100), 2 claim poller-1 (pids 101, 201):"
        " more than one pool start or container runs under this host id; give each its own"
        " --host-id (PULSE_HOST_ID)"]
    # Every process relays a share of its own: ready, but not healthy.
    assert snap.ready()
    data = snap.as_dict()
    assert not data["healthy"] and data["pollers_live"] == 2 and data["host_pollers_live"] == 4
    assert data["hosts"][0] == {"host": HOST, "pollers": 4, "shards": 1}
    assert [(d["host"], d["slot"], d["processes"]) for d in data["duplicates"]] == [
        (HOST, "poller-0", 2), (HOST, "poller-1", 2)]
    report = StatusReport(counts=Counts(0, 0, 0), coordinator="http://x", status=json.loads(json.dumps(data)),
                          error=None)
    lines = report.lines()
    assert lines[0].startswith(f"pool: UNHEALTHY: host {HOST}: 2 processes claim poller-0")
    assert f"pollers on this host ({HOST}): 2 of 2 live; 4 live under host id {HOST} in all" in lines


def test_a_database_or_broker_outage_makes_it_unready_without_stopping_the_monitor() -> None:
    clock, store, depth = Clock(), FakeStore(), FakeDepth()
    monitor = StatusMonitor(settings(), store, depth, lambda: poller_samples(clock.now, {"0": 1, "1": 1}),
                            clock=clock)
    store.fail = True
    snap = monitor.refresh()
    assert not snap.database_ok and snap.database_error == "connection refused"
    assert not snap.ready() and any("database unreachable" in p for p in snap.problems())
    store.fail, depth.value = False, None
    snap = monitor.refresh()
    assert snap.database_ok and not snap.broker_ok and not snap.ready()


POOL_CLIENT = {"X-Requested-By": "pool"}  # what `pool reload` sends


def call(app: CoordinatorApp, path: str, method: str = "GET",
         headers: dict[str, str] | None = None) -> tuple[str, dict]:
    seen: dict[str, Any] = {}

    def start_response(status: str, headers: list, exc_info: Any = None) -> None:
        seen["status"], seen["headers"] = status, dict(headers)

    environ = {"PATH_INFO": path, "REQUEST_METHOD": method, "wsgi.input": io.BytesIO(b""), "QUERY_STRING": "",
               "SERVER_NAME": "x", "SERVER_PORT": "1", "wsgi.url_scheme": "http", "HTTP_HOST": "127.0.0.1:1"}
    for name, value in (headers or {}).items():
        key = name.upper().replace("-", "_")
        environ[key if key in ("CONTENT_LENGTH", "CONTENT_TYPE") else f"HTTP_{key}"] = value
    body = b"".join(app(environ, start_response))
    content_type = seen["headers"].get("Content-Type", "")
    return seen["status"], json.loads(body) if "json" in content_type else {"text": body.decode()}


def test_routes_health_readiness_status_page_and_reload() -> None:
    clock = Clock()
    monitor = StatusMonitor(settings(), FakeStore(), FakeDepth(), lambda: poller_samples(clock.now, {"0": 3}),
                            clock=clock)
    reloads = []
    class NoPollerFiles:
        def collect(self) -> list:
            return []

    collector = NoPollerFiles()
    app = CoordinatorApp(monitor, collector, lambda: reloads.append(1))
    assert call(app, "/healthz") == ("200 OK", {"status": "ok"})
    status, body = call(app, "/readyz")
    assert status.startswith("503") and body == {"ready": False, "problems": ["no status yet"]}
    monitor.refresh()
    status, body = call(app, "/readyz")
    # One of two pollers is live: ready (it relays), but not healthy.
    assert status == "200 OK" and body == {"ready": True, "problems": ["1 of 2 pollers live"]}
    assert call(app, "/status.json")[1]["backlog"] == 7
    assert "<canvas" in call(app, "/")[1]["text"]
    assert "fetch(\"/status.json\"" in call(app, "/static/status.js")[1]["text"]
    assert call(app, "/metrics")[1]["text"].count("pool_backlog_rows 7.0") == 1
    assert call(app, "/-/reload")[0].startswith("405") and reloads == []
    assert call(app, "/-/reload", "POST", POOL_CLIENT)[0] == "202 Accepted" and reloads == [1]
    assert call(app, "/nope")[0].startswith("404")


def test_status_report_lines_and_health() -> None:
    counts = Counts(processed=1200, unprocessed=3, dead=1)
    down = StatusReport(counts, "http://127.0.0.1:9200", None, "no coordinator answers at http://127.0.0.1:9200")
    assert not down.healthy
    assert down.lines() == ["pool: UNHEALTHY: no coordinator answers at http://127.0.0.1:9200",
                            "rows: 1,200 processed, 3 unprocessed, 1 dead"]
    clock = Clock()
    monitor = StatusMonitor(settings(), FakeStore(), FakeDepth(),
                            lambda: poller_samples(clock.now, {"0": 3, "1": 4}), clock=clock)
    snap = monitor.refresh().as_dict()
    snap["refreshed_at"] = __import__("time").time()
    up = StatusReport(counts, "http://127.0.0.1:9200", snap, None)
    text = "\n".join(up.lines())
    assert up.healthy and text.startswith("pool: healthy\n")
    assert "backlog: 7 rows, lag 3.5 s" in text and "broker queue celery: 42 messages" in text
    assert f"pollers on this host ({HOST}): 2 of 2 live" in text
    assert "shards: 2 of 2 held; hosts: here (1 pollers, 1 shards), other (1 pollers, 1 shards)" in text
    assert up.as_dict()["processed"] == 1200


def test_coordinator_url_from_settings() -> None:
    assert coordinator_url(settings()) == "http://127.0.0.1:9200"
    assert coordinator_url(settings(metrics_host="0.0.0.0", metrics_port="9300")) == "http://127.0.0.1:9300"
    assert coordinator_url(settings(metrics_port="0")) is None
    assert coordinator_url(settings(metrics_port="0"), "http://h:1/") == "http://h:1"
