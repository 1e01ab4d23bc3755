"""Addresses as HTTP spells them: the coordinator's URL for a bind address, the host a request's
Host header names, and which addresses are IP literals or loopback."""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

# A DNS name (RFC 1123 labels); IP literals are checked with ipaddress instead.
HOST_NAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$")
# A bound wildcard address is asked on the loopback address of its family.
LOOPBACK_FOR_WILDCARD = {"0.0.0.0": "127.0.0.1", "::": "::1"}


def ip_literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """`host` as an IP address (IPv6 with or without brackets), or None for a name."""
    try:
        return ipaddress.ip_address(host[1:-1] if host.startswith("[") and host.endswith("]") else host)
    except ValueError:
        return None


def is_host(host: str) -> bool:
    """A DNS name or an IP literal: what may stand between `http://` and the port."""
    return ip_literal(host) is not None or bool(HOST_NAME.match(host))


def is_loopback(address: str) -> bool:
    """True for 127.0.0.0/8, ::1 and the name localhost; a wildcard or a routable address is not."""
    ip = ip_literal(address)
    return ip.is_loopback if ip is not None else address.lower().rstrip(".") == "localhost"


def url_host(host: str) -> str:
    """`host` as it goes into a URL: an IPv6 literal in brackets."""
    ip = ip_literal(host)
    return f"[{ip}]" if ip is not None and ip.version == 6 else host


def listen_url(host: str, port: int) -> str:
    """http://host:port as a coordinator binds it, for its log lines."""
    return f"http://{url_host(host)}:{port}"


def client_url(host: str, port: int) -> str:
    """Where a client on this machine asks a coordinator bound to `host`: a wildcard on loopback."""
    return listen_url(LOOPBACK_FOR_WILDCARD.get(host, host), port)


def host_of(header: str) -> str | None:
    """The host named by a Host header (lower case, no port, no brackets), or None if malformed."""
    if not header or not header.isascii() or any(c.isspace() or c in "/?#@\\" for c in header):
        return None
    try:
        parts = urlsplit(f"//{header}")
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number in range
    except ValueError:
        return None
    host = parts.hostname
    if not host:
        return None
    if header.startswith("["):
        return host if ip_literal(host) is not None else None
    return host if is_host(host) else None
