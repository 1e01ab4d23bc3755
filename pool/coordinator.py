"""The coordinator's HTTP side: /metrics aggregated over all pollers, health, status and a page.

Routes:
  GET  /metrics      Prometheus exposition: every poller's metrics plus the coordinator's gauges
  GET  /healthz      200 while the coordinator runs
  GET  /readyz       200 when the database and broker answer and a poller is live, else 503
  GET  /status.json  the latest status snapshot (what `pool status` prints)
  GET  /             the live status page (static files served from this package)
  POST /-/reload     asks `pool start` to reload its settings (as SIGHUP does); 501 when the
                     coordinator runs on its own (`pool coordinator`), with no `pool start` to ask

Every route refuses an unknown Host, and the reload a request without proof that pool's own client
sent it (pool/http_guard.py); pool/http_server.py bounds the connections.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from importlib import resources
from typing import Any

from prometheus_client import CollectorRegistry, make_wsgi_app, multiprocess
from prometheus_client.core import GaugeMetricFamily

from pool.config import Settings
from pool.http_address import ip_literal, is_loopback
from pool.http_guard import Refusal, RequestGuard
from pool.status import Snapshot, StatusMonitor

log = logging.getLogger(__name__)

STATIC_FILES = {
    "/": ("status.html", "text/html; charset=utf-8"),
    "/static/status.js": ("status.js", "text/javascript; charset=utf-8"),
    "/static/status.css": ("status.css", "text/css; charset=utf-8"),
}

MAX_BODY_BYTES = 64 * 1024
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


class PollerFilesCollector(multiprocess.MultiProcessCollector):
    """Reads every poller's metric files, passing over one a poller is still creating.

    prometheus_client creates a file empty and only then sizes it; read in between, it fails
    the whole read with struct.error, and a coordinator that met one at start-up died before
    it was ready. A file is empty only for that moment, so it is counted from the next read on."""

    def collect(self) -> Iterable[Any]:
        files = [path for path in glob.glob(os.path.join(self._path, "*.db")) if _has_data(path)]
        return self.merge(files, accumulate=True)


def _has_data(path: str) -> bool:
    try:
        return os.path.getsize(path) > 0
    except FileNotFoundError:  # a live gauge's file removed by mark_process_dead meanwhile
        return False


def poller_collector() -> multiprocess.MultiProcessCollector:
    """Reads every poller's metric files; unregistered, so it can be asked directly."""
    return PollerFilesCollector(None)


class CoordinatorApp:
    """The WSGI application behind the coordinator's port."""

    def __init__(self, monitor: StatusMonitor, collector: multiprocess.MultiProcessCollector,
                 reload: Callable[[], None] | None, guard: RequestGuard | None = None) -> None:
        # Only these collectors: the default registry would export this process's own
        # (meaningless) process and platform metrics beside the pollers'.
        registry = CollectorRegistry()
        registry.register(collector)
        registry.register(StatusCollector(monitor.current))
        self.metrics = make_wsgi_app(registry)
        self.monitor = monitor
        self.reload = reload
        self.guard = guard or RequestGuard()

    def __call__(self, environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        try:
            body = self._route(environ, start_response)
        except Exception:  # noqa: BLE001 - one broken request must not cost the server
            log.exception("%s %s failed", environ.get("REQUEST_METHOD"), environ.get("PATH_INFO"))
            return self._send(start_response, "500 Internal Server Error", {"error": "internal error"},
                              exc_info=sys.exc_info())
        return [] if environ.get("REQUEST_METHOD") == "HEAD" else body

    def _route(self, environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        path, method = environ.get("PATH_INFO", "/"), environ.get("REQUEST_METHOD", "GET")
        refused = self.guard.refuse_host(environ) or self._refuse_body(environ)
        if refused:
            return self._send(start_response, refused.status, {"error": refused.reason})
        if path == "/-/reload":
            if method != "POST":
                return self._send(start_response, "405 Method Not Allowed", {"error": "use POST"},
                                  allow="POST")
            refused = self.guard.refuse_change(environ)
            if refused:
                return self._send(start_response, refused.status, {"error": refused.reason})
            if self.reload is None:
                # Standalone, the parent is supervisord or the like: a SIGHUP there would reload
                # *its* configuration, not pool's settings.
                return self._send(start_response, "501 Not Implemented", {"error": STANDALONE_RELOAD})
            self.reload()
            return self._send(start_response, "202 Accepted", {"reloading": True})
        if method not in ("GET", "HEAD"):
            return self._send(start_response, "405 Method Not Allowed", {"error": "use GET"},
                              allow="GET, HEAD")
        if path == "/metrics":
            return self.metrics(environ, start_response)
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
        return self._send(start_response, "404 Not Found", {"error": f"no such path: {path[:200]}"})

    @staticmethod
    def _refuse_body(environ: dict[str, Any]) -> Refusal | None:
        """No route reads a body: a large one is refused rather than left for the socket to choke on."""
        length = environ.get("CONTENT_LENGTH") or "0"
        if not length.strip().isdigit():
            return Refusal("400 Bad Request", "Content-Length is not a number")
        if int(length) > MAX_BODY_BYTES:
            return Refusal("413 Content Too Large", f"no request body over {MAX_BODY_BYTES} bytes")
        return None

    @staticmethod
    def _send(start_response: Callable, status: str, body: dict[str, Any], allow: str | None = None,
              exc_info: Any = None) -> list[bytes]:
        data = json.dumps(body, default=str).encode()
        headers = [("Content-Type", "application/json"), ("Cache-Control", "no-cache")]
        if allow:
            headers.append(("Allow", allow))
        if exc_info:  # headers may have been started before the failure
            start_response(status, headers, exc_info)
        else:
            start_response(status, headers)
        return [data]


def guard_for(settings: Settings, bound_address: str) -> RequestGuard:
    """The request rules for a coordinator with these settings bound to `bound_address`."""
    # A name the operator bound the coordinator to is one they mean to be asked by.
    named = [settings.metrics_host] if ip_literal(settings.metrics_host) is None else []
    return RequestGuard(allowed_hosts=[*settings.http_allowed_hosts, *named], token=settings.http_token,
                        beyond_loopback=not is_loopback(bound_address))
