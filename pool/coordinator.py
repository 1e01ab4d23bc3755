"""The coordinator's HTTP side: one /metrics aggregated over all poller processes."""

from __future__ import annotations

import os
import shutil
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, multiprocess, start_http_server


def serve_metrics(host: str, port: int) -> WSGIServer:
    """Start /metrics in a background thread; port 0 picks a free port (see server_port)."""
    # Only the MultiProcessCollector: the default registry would export this process twice.
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server


def reset_metrics_dir(path: str) -> None:
    """Empty the multi-process directory: stale files from an earlier run would be summed in."""
    os.makedirs(path, exist_ok=True)
    for entry in os.listdir(path):
        full = os.path.join(path, entry)
        if os.path.isdir(full):
            shutil.rmtree(full)
        else:
            os.remove(full)
