"""The coordinator's HTTP port against what a browser page, a rebinding attacker, idle or slow
clients and malformed requests send, on a running `pool start` (PostgreSQL and Redis)."""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Iterator

import pytest

from tests.acceptance.test_status import free_port
from tests.helpers import PoolProcess, clean_env, run_pool, wait_until

TOKEN = "s3cret-token-for-the-test-0123456789"


def start_pool(pg_url: str, redis_url: str, queue_name: str, tmp_path, host: str = "127.0.0.1",
               **extra: str) -> tuple[PoolProcess, dict[str, str], int]:
    port = free_port()
    env = clean_env(PULSE_DB_URL=pg_url, PULSE_BROKER_URL=redis_url, PULSE_QUEUE=queue_name,
                    PULSE_METRICS_PORT=str(port), PULSE_METRICS_HOST=host, PULSE_HTTP_TIMEOUT="1", **extra)
    assert run_pool("init-db", env=env, cwd=tmp_path).returncode == 0
    pool = PoolProcess("start", "--workers", "1", env=env, cwd=tmp_path)
    pool.wait_for_line(r"ready: 1 pollers, metrics on http://")
    return pool, env, port


@pytest.fixture
def pool_on_loopback(pg_url, redis_url, queue_name, tmp_path) -> Iterator[tuple[PoolProcess, dict, int]]:
    pool, env, port = start_pool(pg_url, redis_url, queue_name, tmp_path,
                                 PULSE_HTTP_ALLOWED_HOSTS="pool.example")
    try:
        yield pool, env, port
    finally:
        pool.kill()


def request(port: int, method: str, path: str, headers: dict[str, str] | None = None,
            body: bytes | None = None) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        data = response.read()
        return response.status, json.loads(data) if data.startswith(b"{") else {}
    finally:
        connection.close()


def reload_lines(pool: PoolProcess) -> list[str]:
    return [line for line in pool.lines if "reload" in line]


def test_a_cross_site_form_or_a_bare_post_cannot_reload_but_pool_reload_can(pool_on_loopback, tmp_path):
    pool, env, port = pool_on_loopback
    host = {"Host": f"127.0.0.1:{port}"}
    # What a page on another site makes a browser send: a form POST, no custom header.
    form = {**host, "Content-Type": "application/x-www-form-urlencoded", "Origin": "http://evil.example",
            "Sec-Fetch-Site": "cross-site"}
    assert request(port, "POST", "/-/reload", form, b"a=1")[0] == 403
    # Even with our header, a browser request that says it comes from another site.
    assert request(port, "POST", "/-/reload", {**form, "X-Requested-By": "x"})[0] == 403
    same_site = {**host, "X-Requested-By": "x", "Sec-Fetch-Site": "same-site"}
    assert request(port, "POST", "/-/reload", same_site)[0] == 403
    # No proof at all (curl -X POST): refused, and told what to send.
    status, body = request(port, "POST", "/-/reload", host)
    assert status == 403 and "X-Requested-By" in body["error"]

    reloaded = run_pool("reload", env=env, cwd=tmp_path)
    assert reloaded.returncode == 0, reloaded.stderr
    pool.wait_for_line(r"reload: no reloadable setting changed")
    assert len(reload_lines(pool)) == 1, reload_lines(pool)  # only pool reload's got through


def test_every_path_refuses_a_host_name_it_does_not_know(pool_on_loopback):
    _pool, _env, port = pool_on_loopback
    for path in ("/", "/static/status.js", "/status.json", "/metrics", "/healthz", "/readyz"):
        # DNS rebinding: the attacker's name now points at 127.0.0.1, the browser sends that name.
        status, body = request(port, "GET", path, {"Host": f"rebind.evil.example:{port}"})
        assert status == 403 and "PULSE_HTTP_ALLOWED_HOSTS" in body["error"], (path, status)
        for allowed in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", f"pool.example:{port}",
                        f"{socket.gethostname()}:{port}"):
            assert request(port, "GET", path, {"Host": allowed})[0] in (200, 503), (path, allowed)
    assert request(port, "GET", "/healthz", {"Host": "bad host\u00ff"})[0] == 400


def test_beyond_loopback_reload_needs_the_token_and_the_token_is_never_shown(pg_url, redis_url, queue_name,
                                                                              tmp_path):
    # Bound to every address, but asked on 127.0.0.1 only.
    pool, env, port = start_pool(pg_url, redis_url, queue_name, tmp_path, host="0.0.0.0")
    try:
        warning = pool.wait_for_line(r"without PULSE_HTTP_TOKEN: POST /-/reload is refused")
        assert "0.0.0.0" in warning.string
        refused = run_pool("reload", env=env, cwd=tmp_path)
        assert refused.returncode == 1 and "PULSE_HTTP_TOKEN is not set" in refused.stderr, refused.stderr
        assert len(refused.stderr.splitlines()) == 1
        assert request(port, "GET", "/healthz")[0] == 200  # reading still works
    finally:
        pool.kill()

    pool, env, port = start_pool(pg_url, redis_url, queue_name, tmp_path, host="0.0.0.0",
                                 PULSE_HTTP_TOKEN=TOKEN)
    try:
        wrong = run_pool("reload", env={**env, "PULSE_HTTP_TOKEN": "another-token-0123456789"}, cwd=tmp_path)
        assert wrong.returncode == 1 and "wrong token" in wrong.stderr, wrong.stderr
        without = {k: v for k, v in env.items() if k != "PULSE_HTTP_TOKEN"}
        missing = run_pool("reload", env=without, cwd=tmp_path)
        assert missing.returncode == 1 and "token" in missing.stderr
        ok = run_pool("reload", env=env, cwd=tmp_path)
        assert ok.returncode == 0, ok.stderr
        pool.wait_for_line(r"reload: no reloadable setting changed")
        assert "without PULSE_HTTP_TOKEN" not in pool.output()
        for text in (pool.output(), wrong.stderr, missing.stderr, ok.stdout, ok.stderr):
            assert TOKEN not in text and "another-token" not in text
    finally:
        pool.kill()


def test_idle_and_slow_connections_are_closed_and_health_checks_still_answer(pool_on_loopback):
    _pool, _env, port = pool_on_loopback
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(40)]
    slow = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        started = time.monotonic()
        assert request(port, "GET", "/healthz") == (200, {"status": "ok"})
        assert time.monotonic() - started < 1.0  # not queued behind the idle ones

        # A client that dribbles its request out a byte at a time is cut off too (PULSE_HTTP_TIMEOUT=1).
        def dribble_until_closed() -> bool:
            for byte in b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: " + b"x" * 200:
                try:
                    slow.send(bytes([byte]))
                except OSError:
                    return True
                time.sleep(0.05)  # the client's own pace, not a synchronisation
            return False

        assert dribble_until_closed(), "a slow client kept its connection past the timeout"
        assert time.monotonic() - started < 6
        for connection in idle:
            assert connection.recv(100) == b""  # closed by the server, with nothing to say
        assert time.monotonic() - started < 6
    finally:
        for connection in [*idle, slow]:
            connection.close()


RAW_REQUESTS = {
    "HTTP/0.9 request line": b"GET /\r\n",
    "garbage": b"\x00\x01\x02 \r\n\r\n",
    "huge body to reload": b"POST /-/reload HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Requested-By: pool\r\n"
                           b"Content-Length: 999999999\r\n\r\nabc",
    "negative Content-Length": b"POST /-/reload HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Requested-By: pool\r\n"
                               b"Content-Length: -5\r\n\r\n",
    "unknown method": b"BREW /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    "OPTIONS preflight": b"OPTIONS /-/reload HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: http://evil.example\r\n"
                         b"Access-Control-Request-Method: POST\r\n\r\n",
    "GET on reload": b"GET /-/reload HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    "unknown path": b"GET /nope HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    "non-ASCII path": b"GET /\xff\xfe%ff%00 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    "bad query string": b"GET /status.json/x?%zz&&=\xff HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    "request line too long": b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n",
    "too many headers": b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 200 + b"\r\n",
    "malformed Host": b"GET /healthz HTTP/1.1\r\nHost: [::1\r\n\r\n",
}


def status_line(port: int, raw: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(raw)
        reply = b""
        while b"\r\n" not in reply:
            chunk = connection.recv(1000)
            if not chunk:
                break
            reply += chunk
    return reply.split(b"\r\n")[0]


def test_malformed_requests_get_a_clean_4xx_and_the_server_keeps_answering(pool_on_loopback):
    pool, _env, port = pool_on_loopback
    answers = {name: status_line(port, raw) for name, raw in RAW_REQUESTS.items()}
    wrong = {name: line for name, line in answers.items() if not line.startswith(b"HTTP/1.0 4")}
    assert not wrong, wrong
    assert status_line(port, b"GET / HTTP/9.9\r\n\r\n").startswith(b"HTTP/1.0 505")  # a version it lacks
    assert request(port, "GET", "/healthz")[0] == 200
    wait_until(lambda: pool.proc.poll() is None, timeout=1)
    assert "Traceback" not in pool.output() and "reload" not in pool.output(), pool.output()


def ipv6_loopback() -> bool:
    try:
        with socket.create_server(("::1", 0), family=socket.AF_INET6):
            return True
    except OSError:
        return False


@pytest.mark.skipif(not ipv6_loopback(), reason="this machine has no IPv6 loopback (::1)")
def test_the_coordinator_binds_ipv6_and_pool_status_and_reload_reach_it(pg_url, redis_url, queue_name,
                                                                        tmp_path):
    pool, env, port = start_pool(pg_url, redis_url, queue_name, tmp_path, host="::1")
    try:
        pool.wait_for_line(rf"ready: 1 pollers, metrics on http://\[::1\]:{port}/metrics")
        connection = http.client.HTTPConnection("::1", port, timeout=10)
        connection.request("GET", "/healthz")
        assert connection.getresponse().status == 200
        connection.close()

        def healthy_status() -> str | None:
            result = run_pool("status", env=env, cwd=tmp_path)
            return result.stdout if result.returncode == 0 else None

        text = wait_until(healthy_status, timeout=30, message="pool status over IPv6")
        assert f"coordinator: http://[::1]:{port} " in text
        reloaded = run_pool("reload", env=env, cwd=tmp_path)
        assert reloaded.returncode == 0, reloaded.stderr
        assert f"asked the pool at http://[::1]:{port} to reload" in reloaded.stdout
        pool.wait_for_line(r"reload: no reloadable setting changed")
        # The same, with the address written as a URL has it.
        bracketed = run_pool("status", "--url", f"http://[::1]:{port}/", env=env, cwd=tmp_path)
        assert bracketed.returncode == 0, bracketed.stdout + bracketed.stderr
    finally:
        pool.kill()


@pytest.mark.skipif(not ipv6_loopback(), reason="this machine has no IPv6 loopback (::1)")
def test_bound_to_every_ipv6_address_it_answers_ipv4_and_ipv6_loopback(pg_url, redis_url, queue_name,
                                                                        tmp_path):
    pool, env, port = start_pool(pg_url, redis_url, queue_name, tmp_path, host="::")
    try:
        for host in ("127.0.0.1", "::1"):
            connection = http.client.HTTPConnection(host, port, timeout=10)
            connection.request("GET", "/healthz")
            assert connection.getresponse().status == 200, host
            connection.close()
        assert "coordinator: http://[::1]:" in wait_until(
            lambda: run_pool("status", env=env, cwd=tmp_path).stdout, timeout=30, message="pool status")
    finally:
        pool.kill()
