"""A TCP proxy in front of a real service, to cut the network to it and bring it back."""

from __future__ import annotations

import contextlib
import socket
import threading


class TcpProxy:
    """Forwards 127.0.0.1:<port> to an upstream. `cut()` refuses new connections and drops the
    open ones, as a stopped server would; `restore()` listens on the same port again. `hold()`
    keeps the connections open but forwards nothing more, as a server that hangs would.
    `client_connections()` and `bytes_from_upstream` show what the client side does."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self._lock = threading.Lock()
        self._connections: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self._flowing = threading.Event()
        self._flowing.set()
        self.bytes_from_upstream = 0
        probe = socket.create_server(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self.restore()

    def restore(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def hold(self) -> None:
        self._flowing.clear()

    def cut(self) -> None:
        self._flowing.set()  # held data goes nowhere: its sockets are shut below
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            connections, self._connections = self._connections, []
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    close = cut

    def client_connections(self) -> int:
        """Connections to the proxy still open on the client's side, as the kernel sees them:
        a client's close() ends its socket's ESTABLISHED state at once, before the proxy notices."""
        established = "01"
        return sum(1 for _slot, _local, remote, state, *_rest in kernel_tcp_sockets()
                   if state == established and int(remote.rsplit(":", 1)[1], 16) == self.port)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._connections += [client, upstream]
            for source, target in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, target, source is upstream),
                                 daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, from_upstream: bool) -> None:
        try:
            while data := source.recv(65536):
                self._flowing.wait()
                if self._listener is None:  # cut while this data was held
                    return
                if from_upstream:  # counted before the client can have it
                    with self._lock:
                        self.bytes_from_upstream += len(data)
                target.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


def kernel_tcp_sockets() -> list[list[str]]:
    """Every TCP socket of this machine's network namespace, as the fields of its line in
    /proc/net/tcp and tcp6 (local and remote address, state, ..., inode in field 9)."""
    rows = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table, encoding="ascii") as lines:
            rows += [line.split() for line in list(lines)[1:]]
    return rows
