"""`pool status` and `pool reload` talk to a running coordinator over HTTP; this is that side."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from pool.config import Settings
from pool.errors import ConfigError
from pool.http_address import client_url, is_host
from pool.http_guard import CLIENT_HEADER
from pool.redact import redact_url

if TYPE_CHECKING:  # the store pulls in SQLAlchemy: 1 s more for every `pool status --url`
    from pool.store.base import Counts

TIMEOUT_SECONDS = 3.0


def coordinator_url(settings: Settings, url: str | None = None) -> str | None:
    """Where this host's coordinator listens, or None when its port is picked at random.

    Raises ConfigError (one line) for a --url that is not http://host[:port][/path]."""
    if url is not None:
        return checked_url(url)
    if not settings.metrics_port:
        return None
    return client_url(settings.metrics_host, settings.metrics_port)


def checked_url(url: str) -> str:
    """`url` without its trailing slash, once it is a plain http:// URL of a host."""
    shown = redact_url(url.strip())[:100]
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"--url {shown!r} is not a URL: {exc}") from None
    if parts.scheme.lower() != "http" or not parts.hostname:
        raise ConfigError(f"--url must look like http://127.0.0.1:9200, got {shown!r}")
    if port == 0 or parts.query or parts.fragment or parts.username or parts.password:
        raise ConfigError(f"--url must be http://host:port, without port 0, user, query or fragment, "
                          f"got {shown!r}")
    if not url.isascii() or not is_host(parts.hostname):
        raise ConfigError(f"--url has a host that is neither a name nor an IP address: {shown!r}")
    return url.strip().rstrip("/")


def client_headers(settings: Settings) -> dict[str, str]:
    """What the coordinator asks of a request that changes state (see pool/http_guard.py)."""
    headers = {CLIENT_HEADER: "pool"}
    if settings.http_token:
        headers["Authorization"] = f"Bearer {settings.http_token}"
    return headers


def _refusal(exc: urllib.error.HTTPError) -> str:
    """What a coordinator that answered with an error said (its JSON `error`), or the HTTP code."""
    try:
        return str(json.loads(exc.read())["error"])
    except (ValueError, KeyError, TypeError, OSError):
        return f"HTTP {exc.code}"


def fetch_status(base: str) -> tuple[dict[str, Any] | None, str | None]:
    """The coordinator's /status.json, or None and why it could not be read."""
    try:
        with urllib.request.urlopen(f"{base}/status.json", timeout=TIMEOUT_SECONDS) as response:
            return json.loads(response.read()), None
    except urllib.error.HTTPError as exc:  # it answers, but not with the status (e.g. a refused Host)
        return None, f"the coordinator at {base} refused: {_refusal(exc)}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return None, f"no coordinator answers at {base} ({reason}); is `pool start` running?"


def request_reload(base: str, headers: dict[str, str] | None = None) -> str | None:
    """Ask the coordinator to have `pool start` reload its settings; returns an error or None.

    `headers` are client_headers(settings): the proof and token the coordinator requires."""
    request = urllib.request.Request(f"{base}/-/reload", method="POST", data=b"", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS):
            return None
    except urllib.error.HTTPError as exc:
        # A coordinator that answers but cannot reload (standalone, refused) says why in its JSON body.
        return f"the coordinator at {base} cannot reload: {_refusal(exc)}"
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return f"no coordinator answers at {base} ({reason}); is `pool start` running?"


@dataclass
class StatusReport:
    counts: Counts
    coordinator: str | None
    status: dict[str, Any] | None
    error: str | None

    @property
    def problems(self) -> list[str]:
        if self.status is None:
            return [self.error or "no coordinator to ask (PULSE_METRICS_PORT is 0); pass --url"]
        return list(self.status.get("problems", []))

    @property
    def healthy(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {
            "processed": self.counts.processed, "unprocessed": self.counts.unprocessed,
            "dead": self.counts.dead, "healthy": self.healthy, "problems": self.problems,
            "coordinator": self.coordinator, "status": self.status,
        }

    def lines(self) -> list[str]:
        out = ["pool: healthy" if self.healthy else "pool: UNHEALTHY: " + "; ".join(self.problems)]
        c = self.counts
        out.append(f"rows: {c.processed:,} processed, {c.unprocessed:,} unprocessed, {c.dead:,} dead")
        s = self.status
        if s is None:
            return out
        age = max(0.0, time.time() - s["refreshed_at"])
        out.append(f"coordinator: {self.coordinator} (refreshed {age:.1f} s ago)")
        depth = "unknown" if s["queue_depth"] is None else f"{s['queue_depth']:,} messages"
        out.append(f"backlog: {_count(s['backlog'])} rows, lag {_seconds(s['lag_seconds'])},"
                   f" relaying {s['rows_per_second']:,.0f} rows/s; broker queue {s['queue']}: {depth}")
        held = sum(1 for shard in s["shards"] if shard["owner"])
        hosts = ", ".join(f"{h['host']} ({h['pollers']} pollers, {h['shards']} shards)" for h in s["hosts"])
        out.append(f"shards: {held} of {len(s['shards'])} held; hosts: {hosts or 'none live'}")
        line = f"pollers on this host ({s['host']}): {s['pollers_live']} of {s['pollers_expected']} live"
        elsewhere = s.get("host_pollers_live", s["pollers_live"])
        if elsewhere != s["pollers_live"]:
            # Other processes heartbeat under the same host id (see the problems above).
            line += f"; {elsewhere} live under host id {s['host']} in all"
        out.append(line)
        header = ("poller", "pid", "shards", "state", "heartbeat", "rows/s", "batch", "poll", "relayed")
        rows = [header] + [(
            f"poller-{p['worker']}", str(p["pid"] or "-"), str(len(p["shards"])),
            p["state"],
            _seconds(p["heartbeat_age_seconds"]), f"{p['rows_per_second']:,.0f}",
            _count(p["batch_size"]), _seconds(p["poll_interval"]), _count(p["acked"]),
        ) for p in s["pollers"]]
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        out.extend("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
                   for row in rows)
        return out


def _count(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 120:
        return f"{value:.1f} s"
    if value < 7200:
        return f"{value / 60:.1f} min"
    return f"{value / 3600:.1f} h"
