"""Keep passwords out of logs, errors and metrics."""

import re

# As SQLAlchemy parses URLs: a password may hold "/" and ":" but not "@".
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:@/]*):(?P<password>[^@]*)@")


def redact_url(url: str) -> str:
    """`scheme://user:secret@host/db` -> `scheme://user:***@host/db`; other URLs unchanged."""
    return _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:***@", url)


def redact_text(message: str, *urls: str) -> str:
    """Replace any full URL (and its bare password) from `urls` inside a message."""
    for url in urls:
        match = _USERINFO.search(url)
        if url:
            message = message.replace(url, redact_url(url))
        if match and match["password"]:
            message = message.replace(match["password"], "***")
    return message
