"""The coordinator's HTTP side: /metrics aggregated over all pollers, health, status and a page.

Routes:
  GET  /metrics      Prometheus exposition: every poller's metrics plus the coordinator's gauges
  GET  /healthz      200 while the coordinator runs
  GET  /readyz       200 when the database and broker answer and a poller is live, else 503
  GET  /status.json  the latest status snapshot (what `pool status` prints)
  GET  /             the live status page (static files served from this package)
  POST /-/reload     asks `pool start` to reload its settings (as SIGHUP does); 501 when the
                     coordinator runs on its own (`pool coordinator`), with no `pool start` to ask
"""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from importlib import resources
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app, multiprocess
from prometheus_client.core import GaugeMetricFamily

from pool.status import Snapshot, StatusMonitor

STATIC_FILES = {
    "/": ("status.html", "text/html; charset=utf-8"),
    "/static/status.js": ("status.js", "text/javascript; charset=utf-8"),
    "/static/status.css": ("status.css", "text/css; charset=utf-8"),
}

STANDALONE_RELOAD = (
    "this coordinator runs on its own (pool coordinator), not under pool start: restart the pollers "
    "to apply new settings (supervisorctl restart pool:*)"
)


class StatusCollector:
    """The coordinator's own gauges, from the monitor's latest snapshot (no query per scrape)."""

    def __init__(self, current: Callable[[], Snapshot]) -> None:
        self.current = current

    def collect(self) -> Iterator[GaugeMetricFamily]:
        snap = self.current()
        if not snap.refreshed_at:
            return
        gauges = [
            ("pool_backlog_rows", "Rows not yet relayed (unprocessed, not dead)", snap.backlog),
            ("pool_lag_seconds", "Age of the oldest unprocessed row", snap.lag_seconds),
            ("pool_dead_rows", "Rows that used up their attempts", snap.dead),
            ("pool_broker_queue_messages", "Messages waiting in the Celery queue", snap.queue_depth),
        ]
        for name, help_text, value in gauges:
            if value is not None:
                yield GaugeMetricFamily(name, help_text, value=value)
        yield GaugeMetricFamily("pool_pollers_live", "Pollers with a recent heartbeat",
                                value=snap.pollers_live)
        yield GaugeMetricFamily("pool_status_refresh_timestamp_seconds",
                                "Unix time of the last status refresh", value=snap.refreshed_at)
        shards = GaugeMetricFamily("pool_backlog_shard_rows", "Rows not yet relayed, per shard",
                                   labels=["shard"])
        for shard, count in sorted(snap.shards.items()):
            shards.add_metric([str(shard)], count)
        yield shards


def poller_collector() -> multiprocess.MultiProcessCollector:
    """Reads every poller's metric files; unregistered, so it can be asked directly."""
    return multiprocess.MultiProcessCollector(None)


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        """Requests are not worth a log line each."""


class CoordinatorApp:
    """The WSGI application behind the coordinator's port."""

    def __init__(self, monitor: StatusMonitor, collector: multiprocess.MultiProcessCollector,
                 reload: Callable[[], None] | None) -> None:
        # Only these collectors: the default registry would export this process's own
        # (meaningless) process and platform metrics beside the pollers'.
        registry = CollectorRegistry()
        registry.register(collector)
        registry.register(StatusCollector(monitor.current))
        self.metrics = make_wsgi_app(registry)
        self.monitor = monitor
        self.reload = reload

    def __call__(self, environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        path, method = environ.get("PATH_INFO", "/"), environ.get("REQUEST_METHOD", "GET")
        if path == "/metrics":
            return self.metrics(environ, start_response)
        if path == "/-/reload":
            if method != "POST":
                return self._send(start_response, "405 Method Not Allowed", {"error": "use POST"})
            if self.reload is None:
                # Standalone, the parent is supervisord or the like: a SIGHUP there would reload
                # *its* configuration, not pool's settings.
                return self._send(start_response, "501 Not Implemented", {"error": STANDALONE_RELOAD})
            self.reload()
            return self._send(start_response, "202 Accepted", {"reloading": True})
        if method not in ("GET", "HEAD"):
            return self._send(start_response, "405 Method Not Allowed", {"error": "use GET"})
        if path == "/healthz":
            return self._send(start_response, "200 OK", {"status": "ok"})
        snap = self.monitor.current()
        if path == "/readyz":
            ready = snap.ready()
            body = {"ready": ready, "problems": snap.problems()}
            return self._send(start_response, "200 OK" if ready else "503 Service Unavailable", body)
        if path == "/status.json":
            return self._send(start_response, "200 OK", snap.as_dict())
        if path in STATIC_FILES:
            name, content_type = STATIC_FILES[path]
            data = resources.files("pool.static").joinpath(name).read_bytes()
            start_response("200 OK", [("Content-Type", content_type), ("Cache-Control", "no-cache")])
            return [data]
        return self._send(start_response, "404 Not Found", {"error": f"no such path: {path}"})

    @staticmethod
    def _send(start_response: Callable, status: str, body: dict[str, Any]) -> list[bytes]:
        data = json.dumps(body, default=str).encode()
        start_response(status, [("Content-Type", "application/json"), ("Cache-Control", "no-cache")])
        return [data]


def serve(host: str, port: int, app: CoordinatorApp) -> WSGIServer:
    """Serve `app` from a background thread; port 0 picks a free port (see server_port)."""
    server = make_server(host, port, app, server_class=_Server, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="coordinator-http", daemon=True).start()
    return server


def ask_parent_to_reload() -> None:
    """`pool start` (the coordinator's parent) reloads its settings on SIGHUP."""
    os.kill(os.getppid(), signal.SIGHUP)
