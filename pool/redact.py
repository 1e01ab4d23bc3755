"""Keep passwords out of logs, errors and metrics.

Users write URLs that no parser agrees on: an unencoded `@`, `:` or `/` in a password,
`?password=` in the query, percent-encoding or not. Each parser (SQLAlchemy, kombu, urllib)
would split such a URL differently, so redaction does not parse: it hides, generously, every
span any of them could take for a secret.
"""

from __future__ import annotations

import re
from urllib.parse import quote, quote_plus, unquote, unquote_plus

MASK = "***"
# A URL inside a message: a scheme, then everything up to whitespace or the next URL.
_URL = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<rest>(?:(?![A-Za-z][A-Za-z0-9+.-]*://)\S)*)")
# Query parameters whose value is a secret: password, passwd, pass, pwd, sslpassword, token,
# secret, key, api_key, auth... (a harmless one such as sslkey, a file name, is hidden too).
_SECRET_PARAMETER = re.compile(
    r"(?P<name>[?&;][^=&;#\s]*(?:pass|pwd|secret|token|key|auth|cred)[^=&;#\s]*=)(?P<value>[^&;#\s]*)",
    re.IGNORECASE,
)


# A configured URL is one URL, whatever it holds: a password such as `A://` must not be taken for
# the start of another URL, as it is inside a message, where URLs may follow one another.
_WHOLE_URL = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<rest>\S*)")
# A URL's text up to the first `?` after its first `@` (all of it if there is none).
_BEFORE_QUERY = re.compile(r"[^@]*@?[^?]*")


def _urls_in(url: str) -> list[re.Match]:
    whole = _WHOLE_URL.fullmatch(url)
    return [whole] if whole else list(_URL.finditer(url))


def _split_userinfo(rest: str) -> tuple[str, str, str] | None:
    """(user, password, after) when `rest` (a URL after `scheme://`) has `user:password@`.

    The password runs to the LAST `@`: a password may hold `@`, `:` and `/` unencoded, a host
    holds none of them."""
    userinfo, at, after = rest.rpartition("@")
    user, colon, password = userinfo.partition(":")
    return (user, password, at + after) if colon else None


def _redact_one(match: re.Match) -> str:
    rest = match["rest"]
    parts = _split_userinfo(rest)
    if parts is not None:
        user, _password, after = parts
        rest = f"{user}:{MASK}{after}"
    rest = _SECRET_PARAMETER.sub(lambda m: f"{m['name']}{MASK}", rest)
    return f"{match['scheme']}{rest}"


def redact_url(text: str) -> str:
    """Every URL in `text` with its password and secret query values as ***:
    `scheme://user:secret@host/db?password=x` -> `scheme://user:***@host/db?password=***`.
    A text that is one URL and nothing else (a configured one) is redacted as one URL."""
    whole = _WHOLE_URL.fullmatch(text)
    return _redact_one(whole) if whole else _URL.sub(_redact_one, text)


def secrets_of(url: str) -> set[str]:
    """Every string in `url` that some parser could take for a secret, as written, decoded and
    encoded, for hiding where a driver quotes it without the URL around it."""
    found: set[str] = set()
    for match in _urls_in(url):
        rest = match["rest"]
        # With an `@` in the query too, a parser that ends the authority at the first `?` after
        # an `@` sees a shorter password.
        for authority in (rest, _BEFORE_QUERY.match(rest)[0]):
            parts = _split_userinfo(authority)
            if parts is not None:
                found.add(parts[1])
        found.update(m["value"] for m in _SECRET_PARAMETER.finditer(rest))
    plain = found | {form for secret in found for form in (unquote(secret), unquote_plus(secret))}
    # Encoded as a URL writes it, as a form does (a space as +), and as SQLAlchemy renders a URL
    # (spaces and + left as they are).
    encoded = {form for secret in plain
               for form in (quote(secret, safe=""), quote_plus(secret), quote(secret, safe=" +"))}
    return {secret for secret in plain | encoded if secret and secret != MASK}


def redact_text(message: str, *urls: str) -> str:
    """`message` with the URLs `urls` redacted, their secrets hidden wherever they appear on
    their own, and any other URL's password hidden by pattern."""
    secrets: set[str] = set()
    for url in urls:
        if url:
            message = message.replace(url, redact_url(url))
            secrets |= secrets_of(url)
    # Longest first, so that a secret holding a shorter one is hidden whole.
    for secret in sorted(secrets, key=len, reverse=True):
        message = message.replace(secret, MASK)
    return redact_url(message)
