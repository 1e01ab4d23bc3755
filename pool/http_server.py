"""The coordinator's HTTP server: wsgiref's, bounded so that no client can hold it.

- A connection has `timeout` seconds to send its whole request (idle and slow clients alike; a
  reaper thread closes the late ones) and each later read or write of the socket gets as long.
- At most `max_connections` are handled at once, one thread each; one more is answered 503 at
  once instead of waiting unseen. The listen backlog is 128 (wsgiref's is 5).
- IPv4, IPv6 (`::` takes IPv4 too) and names bind alike.
- Malformed requests get a 4xx, and a client that disconnects or times out is closed quietly.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import sys
import threading
import time
from collections.abc import Callable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import ServerHandler, WSGIRequestHandler, WSGIServer

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 64
LISTEN_BACKLOG = 128
BUSY_RESPONSE = (b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                 b"Connection: close\r\nRetry-After: 1\r\n\r\n"
                 b'{"error": "too many connections"}')


def address_family(host: str, port: int) -> int:
    """The family `host` binds in: IPv6 for ::1 and ::; for a name, IPv4 when it has an IPv4
    address (as before IPv6 was supported, and what clients that spell out 127.0.0.1 expect)."""
    families = [info[0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                       flags=socket.AI_PASSIVE)]
    return socket.AF_INET if socket.AF_INET in families else families[0]


class QuietServerHandler(ServerHandler):
    def log_exception(self, exc_info: Any) -> None:
        if isinstance(exc_info[1], OSError):  # the client went away or stalled mid-reply
            log.debug("reply not sent: %s", exc_info[1])
        else:
            log.error("HTTP request failed", exc_info=exc_info)


class QuietRequestHandler(WSGIRequestHandler):
    """wsgiref's handler, without a log line per request or a traceback per broken client."""

    default_request_version = "HTTP/1.0"  # error replies to malformed lines get a status line

    def setup(self) -> None:
        self.timeout = self.server.connection_timeout
        super().setup()
        self.server.reading(self.connection)

    def handle(self) -> None:
        """wsgiref's handle(), with its ServerHandler quietened and a lost client closed quietly."""
        try:
            self.raw_requestline = self.rfile.readline(65537)
            if len(self.raw_requestline) > 65536:
                self.requestline = self.request_version = self.command = ""
                self.send_error(414)
                return
            if not self.parse_request():  # an error reply was sent, or the client is gone
                return
            handler = QuietServerHandler(self.rfile, self.wfile, sys.stderr, self.get_environ(),
                                         multithread=False)
            handler.request_handler = self
            handler.run(self.server.get_app())
        except OSError as exc:  # TimeoutError and ConnectionError included
            log.debug("connection from %s closed: %s", self.client_address[0], exc)

    def parse_request(self) -> bool:
        if len(self.raw_requestline.split()) == 2:  # HTTP/0.9 has no headers to wait for
            self.command, self.requestline, self.request_version = None, "", "HTTP/1.0"
            self.send_error(400, "HTTP/0.9 requests are not supported")
            return False
        parsed = super().parse_request()
        # A request cut short by the reaper is not answered; past this point the app and the
        # reply are bounded by the socket timeout.
        in_time = self.server.done_reading(self.connection)
        return parsed and in_time

    def finish(self) -> None:
        self.server.done_reading(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        """Requests are not worth a log line each."""


class BoundedWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, host: str, port: int, app: Callable, timeout: float,
                 max_connections: int = MAX_CONNECTIONS) -> None:
        self.address_family = address_family(host, port)
        self.connection_timeout = timeout
        self._slots = threading.BoundedSemaphore(max_connections)
        self._deadlines: dict[socket.socket, float] = {}
        self._deadlines_lock = threading.Lock()
        self._stopped = threading.Event()
        super().__init__((host, port), QuietRequestHandler)
        self.set_app(app)
        threading.Thread(target=self._reap, name="coordinator-http-reaper", daemon=True).start()

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:
            # `::` means every address, IPv4 ones included (as in http.server's DualStackServer).
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            try:
                request.setblocking(False)
                request.send(BUSY_RESPONSE)  # fits any fresh socket's buffer; never blocks
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.exception("HTTP request from %s failed", client_address[0] if client_address else "?")

    def reading(self, connection: socket.socket) -> None:
        with self._deadlines_lock:
            self._deadlines[connection] = time.monotonic() + self.connection_timeout

    def done_reading(self, connection: socket.socket) -> bool:
        """Stop the clock; False when the reaper already closed the connection."""
        with self._deadlines_lock:
            return self._deadlines.pop(connection, None) is not None

    def _reap(self) -> None:
        """Close connections still sending their request after `timeout`: a socket timeout alone
        lets a client that sends a byte now and then hold its thread for ever."""
        while not self._stopped.wait(min(1.0, self.connection_timeout / 4)):
            now = time.monotonic()
            with self._deadlines_lock:
                late = [c for c, deadline in self._deadlines.items() if deadline <= now]
                for connection in late:
                    del self._deadlines[connection]
            for connection in late:
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked reading it

    def start(self) -> None:
        """Answer requests from a background thread (the socket already listens)."""
        threading.Thread(target=self.serve_forever, name="coordinator-http", daemon=True).start()

    def server_close(self) -> None:
        self._stopped.set()
        super().server_close()


def serve(host: str, port: int, app: Callable, timeout: float,
          max_connections: int = MAX_CONNECTIONS) -> BoundedWSGIServer:
    """Serve `app` from a background thread; port 0 picks a free port (see server_port)."""
    server = BoundedWSGIServer(host, port, app, timeout, max_connections)
    server.start()
    return server
