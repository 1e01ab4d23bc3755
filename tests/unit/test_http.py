"""The coordinator's HTTP rules without services: Host parsing, the request guard, the settings
behind them, the bounded server, and one-line errors for a bad --url."""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path

import pytest

from pool.config import load_settings
from pool.errors import ConfigError
from pool.http_address import client_url, host_of, listen_url
from pool.http_guard import RequestGuard
from pool.http_server import LISTEN_BACKLOG, serve
from tests.helpers import clean_env, run_pool


@pytest.mark.parametrize(("header", "host"), [
    ("127.0.0.1:9200", "127.0.0.1"), ("[::1]:9200", "::1"), ("[::1]", "::1"), ("LocalHost", "localhost"),
    ("relay-1.internal:9200", "relay-1.internal"), ("relay-1.internal.", "relay-1.internal."),
    ("[::1", None), ("[evil]:1", None), ("a b", None), ("h:port", None), ("h:99999", None), ("\u00ff", None),
    ("evil.example@127.0.0.1", None), ("", None), ("a/b", None),
])
def test_host_of_a_host_header(header: str, host: str | None) -> None:
    assert host_of(header) == host


def test_urls_bracket_ipv6_and_ask_a_wildcard_on_loopback() -> None:
    assert listen_url("::1", 9200) == "http://[::1]:9200"
    assert listen_url("0.0.0.0", 1) == "http://0.0.0.0:1"
    assert client_url("::", 9200) == "http://[::1]:9200"
    assert client_url("0.0.0.0", 9200) == "http://127.0.0.1:9200"
    assert client_url("relay-1", 9200) == "http://relay-1:9200"


def environ(**headers: str) -> dict[str, str]:
    return {f"HTTP_{k.upper()}": v for k, v in headers.items()}


def test_the_guard_allows_ip_literals_own_names_and_configured_ones_only() -> None:
    guard = RequestGuard(allowed_hosts=["pool.example"], names=["thishost"])
    for host in ("127.0.0.1:1", "10.0.0.5", "[::1]:1", "THISHOST:1", "pool.example:1", "pool.example."):
        assert guard.refuse_host(environ(host=host)) is None, host
    assert guard.refuse_host({}) is None  # no browser sends a request without Host
    assert guard.refuse_host(environ(host="evil.example:1")).status.startswith("403")
    assert guard.refuse_host(environ(host="[::1")).status.startswith("400")
    assert RequestGuard(allowed_hosts=["*"], names=[]).refuse_host(environ(host="any.example")) is None


def test_the_guard_wants_proof_of_pools_client_and_the_token() -> None:
    guard = RequestGuard(names=[])
    ok = environ(host="127.0.0.1:9", x_requested_by="pool")
    assert guard.refuse_change(ok) is None
    assert guard.refuse_change(environ(host="127.0.0.1:9")).status.startswith("403")
    assert guard.refuse_change({**ok, "HTTP_SEC_FETCH_SITE": "cross-site"}) is not None
    assert guard.refuse_change({**ok, "HTTP_SEC_FETCH_SITE": "same-origin"}) is None
    assert guard.refuse_change({**ok, "HTTP_ORIGIN": "http://evil.example"}) is not None
    assert guard.refuse_change({**ok, "HTTP_ORIGIN": "null"}) is not None
    assert guard.refuse_change({**ok, "HTTP_ORIGIN": "http://127.0.0.1:9"}) is None

    token = "t" * 20
    with_token = RequestGuard(token=token, beyond_loopback=True, names=[])
    assert not with_token.changes_refused
    assert with_token.refuse_change(ok).status.startswith("401")
    assert with_token.refuse_change({**ok, "HTTP_AUTHORIZATION": "Bearer wrong"}).status.startswith("401")
    assert with_token.refuse_change({**ok, "HTTP_AUTHORIZATION": f"Bearer {token}"}) is None
    refused = RequestGuard(beyond_loopback=True, names=[]).refuse_change(ok)
    assert refused.status.startswith("403") and "PULSE_HTTP_TOKEN" in refused.reason


def test_http_settings_are_validated_and_the_token_is_never_echoed() -> None:
    settings = load_settings(environ={"PULSE_HTTP_ALLOWED_HOSTS": " Pool , relay-1.internal ,",
                                      "PULSE_HTTP_TOKEN": "x" * 16, "PULSE_HTTP_TIMEOUT": "2.5",
                                      "PULSE_METRICS_HOST": "[::1]"})
    assert settings.http_allowed_hosts == ("pool", "relay-1.internal")
    assert settings.http_timeout == 2.5 and settings.metrics_host == "::1"
    assert "x" * 16 not in repr(settings)
    for secret in ("short-secret", "has a space in it, and long", "\u00fc" * 20):
        with pytest.raises(ConfigError) as caught:
            load_settings(environ={"PULSE_HTTP_TOKEN": secret})
        assert secret not in str(caught.value) and "PULSE_HTTP_TOKEN" in str(caught.value)
    for bad in ("a b", "http://x", "h:1", "[::1"):
        with pytest.raises(ConfigError, match="PULSE_METRICS_HOST"):
            load_settings(environ={"PULSE_METRICS_HOST": bad})
    with pytest.raises(ConfigError, match="PULSE_HTTP_ALLOWED_HOSTS"):
        load_settings(environ={"PULSE_HTTP_ALLOWED_HOSTS": "ok, not/ok"})


BAD_URLS = ["not a url", "http://[::1", "http://127.0.0.1:notaport", "http://127.0.0.1:99999", "ftp://x:1",
            "file:///etc/passwd", "http://", "127.0.0.1:9200", "http://a b:1", "http://u:secret@h:1", ""]


@pytest.mark.parametrize("command", ["reload", "status"])
def test_a_bad_url_is_one_line_and_exit_2(command: str, tmp_path: Path) -> None:
    env = clean_env(PULSE_DB_URL=f"sqlite:///{tmp_path / 'signals.db'}")
    for url in BAD_URLS:
        result = run_pool(command, "--url", url, env=env, cwd=tmp_path)
        assert result.returncode == 2, (url, result.stdout, result.stderr)
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("pool: error: --url"), (url, result.stderr)
        assert "secret" not in result.stderr


class Nothing:
    def __call__(self, environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]


def test_connections_over_the_cap_are_answered_503_at_once_and_slots_come_back() -> None:
    server = serve("127.0.0.1", 0, Nothing(), timeout=30, max_connections=3)
    port = server.server_port
    try:
        assert server.request_queue_size == LISTEN_BACKLOG >= 128
        held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(3)]
        with socket.create_connection(("127.0.0.1", port), timeout=10) as extra:
            assert extra.recv(100).startswith(b"HTTP/1.0 503")
        for connection in held:
            connection.close()  # their threads end, their slots come back

        def answers() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
                    return response.status == 200
            except OSError:
                return False

        from tests.helpers import wait_until
        wait_until(answers, timeout=10, message="a free slot after the held connections closed")
    finally:
        server.shutdown()
        server.server_close()


def test_pool_status_says_the_coordinator_refused_rather_than_that_none_answers() -> None:
    from pool.coordinator import CoordinatorApp
    from pool.status import StatusMonitor
    from pool.status_client import fetch_status
    from tests.unit.test_status import FakeDepth, FakeStore, settings

    class NoPollerFiles:
        def collect(self) -> list:
            return []

    app = CoordinatorApp(StatusMonitor(settings(), FakeStore(), FakeDepth(), list), NoPollerFiles(), None,
                         RequestGuard(names=[]))
    server = serve("127.0.0.1", 0, app, timeout=5)
    try:
        # Asked by a name it does not know (as with --url http://relay-1.internal:9200 unlisted).
        class AskedByName(urllib.request.HTTPHandler):
            def http_request(self, request):
                request.add_unredirected_header("Host", "relay-1.internal")
                return super().http_request(request)

        urllib.request.install_opener(urllib.request.build_opener(AskedByName()))
        try:
            status, error = fetch_status(f"http://127.0.0.1:{server.server_port}")
        finally:
            urllib.request.install_opener(None)  # urlopen builds its default one again
        assert status is None
        assert error == (f"the coordinator at http://127.0.0.1:{server.server_port} refused: host "
                         "'relay-1.internal' is not allowed: add it to PULSE_HTTP_ALLOWED_HOSTS")
    finally:
        server.shutdown()
        server.server_close()
