"""Who may ask the coordinator what: Host names (against DNS rebinding), and proof that a request
that changes something (POST /-/reload) comes from pool's own client, not from a web page.

- Every request: its Host must be an IP literal (a rebinding page cannot make a browser send one),
  localhost, one of this machine's names, the name the coordinator binds, or one listed in
  PULSE_HTTP_ALLOWED_HOSTS (`*` allows any). A request without Host comes from no browser.
- A request that changes state must carry `X-Requested-By` (a page can only send a custom header
  cross-site after a CORS preflight, which the coordinator never grants), and must not say that it
  comes from another site (Origin, Sec-Fetch-Site). With PULSE_HTTP_TOKEN set it must also carry
  `Authorization: Bearer <token>`; a coordinator bound beyond loopback without a token refuses it.
"""

from __future__ import annotations

import hmac
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pool.http_address import host_of, ip_literal

CLIENT_HEADER = "X-Requested-By"
SAME_ORIGIN_FETCHES = ("same-origin", "none")  # "none": typed into the address bar


@dataclass(frozen=True)
class Refusal:
    status: str
    reason: str


def machine_names() -> set[str]:
    """This machine's own names: a browser that asks for them is not being rebound."""
    names = {"localhost"}
    for name in (socket.gethostname(), socket.getfqdn()):
        if name:
            names.add(name.lower().rstrip("."))
    return names


class RequestGuard:
    """Decides, per request, whether the coordinator answers it."""

    def __init__(self, allowed_hosts: Iterable[str] = (), token: str = "", beyond_loopback: bool = False,
                 names: Iterable[str] | None = None) -> None:
        allowed = {h.lower().rstrip(".") for h in allowed_hosts}
        self.any_host = "*" in allowed
        self.names = allowed | (machine_names() if names is None else set(names))
        self.token = token
        # Bound beyond loopback without a token, anyone on the network could reload the pool.
        self.changes_refused = beyond_loopback and not token

    def refuse_host(self, environ: Mapping[str, Any]) -> Refusal | None:
        header = environ.get("HTTP_HOST")
        if header is None or self.any_host:
            return None
        host = host_of(header)
        if host is None:
            return Refusal("400 Bad Request", "malformed Host header")
        if ip_literal(host) is not None or host.rstrip(".") in self.names:
            return None
        return Refusal("403 Forbidden", f"host {host!r} is not allowed: add it to PULSE_HTTP_ALLOWED_HOSTS")

    def refuse_change(self, environ: Mapping[str, Any]) -> Refusal | None:
        """Why a state-changing request is refused, or None; call after refuse_host."""
        if self.changes_refused:
            return Refusal("403 Forbidden", "the coordinator listens beyond loopback and PULSE_HTTP_TOKEN is "
                                            "not set, so it changes nothing over HTTP (SIGHUP still reloads)")
        fetch_site = environ.get("HTTP_SEC_FETCH_SITE")
        if fetch_site is not None and fetch_site not in SAME_ORIGIN_FETCHES:
            return Refusal("403 Forbidden", f"cross-site request refused (Sec-Fetch-Site: {fetch_site[:20]})")
        origin = environ.get("HTTP_ORIGIN")
        if origin is not None and origin != f"http://{environ.get('HTTP_HOST', '')}":
            return Refusal("403 Forbidden", "cross-origin request refused (Origin is not this coordinator)")
        if not environ.get("HTTP_" + CLIENT_HEADER.upper().replace("-", "_")):
            return Refusal("403 Forbidden", f"a request that changes state needs the header {CLIENT_HEADER} "
                                            "(pool reload sends it)")
        if self.token and not self._token_matches(environ.get("HTTP_AUTHORIZATION", "")):
            return Refusal("401 Unauthorized", "missing or wrong token: send Authorization: Bearer "
                                               "<PULSE_HTTP_TOKEN> (pool reload sends it)")
        return None

    def _token_matches(self, authorization: str) -> bool:
        scheme, _, given = authorization.partition(" ")
        # Constant time: a timing side channel must not spell the token out.
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self.token.encode())
