"""The NOTIFY listener logs in with the configured password, not the redacted one.

The test PostgreSQL trusts every local connection, so it would accept any password: a server
that asks for the password in clear text, as a password-checking PostgreSQL may, and records it
tells what the listener really sends (psycopg speaks to it as to any server)."""

from __future__ import annotations

import socket
import struct
import threading

from pool.store import open_store
from tests.helpers import make_settings

PASSWORD = "s3cret:p@ss/word"  # characters a URL must encode


def message(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


class PasswordAskingServer:
    """Answers one connection's startup with a clear-text password request, keeps the password
    it gets, then refuses the login."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.passwords: list[str] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _read_exactly(self, conn: socket.socket, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = conn.recv(size - len(data))
            if not chunk:
                raise ConnectionError("client went away")
            data += chunk
        return data

    def _serve(self) -> None:
        self.sock.settimeout(30)
        try:
            while not self.passwords:
                conn, _ = self.sock.accept()
                with conn:
                    self._handle(conn)
        except (OSError, ConnectionError):
            pass

    def _handle(self, conn: socket.socket) -> None:
        length = struct.unpack("!I", self._read_exactly(conn, 4))[0]
        code = struct.unpack("!I", self._read_exactly(conn, 4))[0]
        self._read_exactly(conn, length - 8)
        if code == 80877103:  # SSLRequest: "no", then the real startup message follows
            conn.sendall(b"N")
            length = struct.unpack("!I", self._read_exactly(conn, 4))[0]
            self._read_exactly(conn, length - 4)
        conn.sendall(message(b"R", struct.pack("!I", 3)))  # AuthenticationCleartextPassword
        kind = self._read_exactly(conn, 1)
        length = struct.unpack("!I", self._read_exactly(conn, 4))[0]
        body = self._read_exactly(conn, length - 4)
        if kind == b"p":
            self.passwords.append(body.rstrip(b"\0").decode())
        error = b"SFATAL\0C28P01\0Mpassword authentication failed\0\0"
        conn.sendall(message(b"E", error))

    def close(self) -> None:
        self.sock.close()
        self.thread.join(timeout=5)


def test_the_notify_listener_sends_the_configured_password_not_the_redacted_one() -> None:
    from urllib.parse import quote

    server = PasswordAskingServer()
    try:
        url = f"postgresql://pulse:{quote(PASSWORD, safe='')}@127.0.0.1:{server.port}/pulse"
        store = open_store(make_settings(db_url=url))
        listener = store.wake_listener()
        listener.listen()  # fails at the login; polling would go on without it
        listener.close()
        store.close()
    finally:
        server.close()
    assert server.passwords == [PASSWORD]
