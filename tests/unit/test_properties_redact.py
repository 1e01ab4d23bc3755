"""No piece of a password survives redaction, for any password and any way a user writes it in a
URL or a driver prints it (property tests): log lines, error messages and redacted URLs hold no
substring of 4 or more characters of the password in any of its encodings."""

from __future__ import annotations

import logging
import re
from urllib.parse import quote, quote_plus, unquote

from hypothesis import example, given, settings
from hypothesis import strategies as st

from pool.logs import make_formatter
from pool.redact import MASK, redact_text, redact_url

SHORTEST = 4  # shorter pieces occur in any text by chance (and in the host, the user...)

# Any unicode, with the characters URL encoding changes or parsers split on made frequent.
passwords = st.text(st.one_of(st.sampled_from("@:/%#?&;= +'\"\\"), st.characters(exclude_categories=("Cs",))),
                    min_size=SHORTEST, max_size=24).filter(lambda p: "*" not in p and p.strip() == p)


def printed_forms(password: str) -> set[str]:
    """How a password can be printed: as written, percent-encoded (fully, the form-encoding way
    with + for a space, or as SQLAlchemy renders a URL, spaces and + left as they are), decoded."""
    return {password, quote(password, safe=""), quote_plus(password), quote(password, safe=" +"),
            unquote(password)}


def urls(password: str) -> list[str]:
    """URLs a user could configure holding `password`. Whitespace (control characters such as
    \x1f included) is encoded even in the raw forms: unencoded, it ends the URL in any message."""
    encoded = quote(password, safe="")
    raw = re.sub(r"\s", lambda m: quote(m[0], safe=""), password)
    found = [
        f"postgresql://pulse:{encoded}@db.example.com:5432/pulse",
        f"postgresql://pulse:{raw}@db.example.com:5432/pulse",
        f"postgresql://pulse@db/pulse?sslmode=require&password={encoded}",
        f"redis://:{raw}@cache:6379/0",
        f"redis://cache:6379/0?password={encoded}",
        f"amqp://relay:{encoded}@rabbit:5672//",
        f"amqp://relay:{raw}@rabbit:5672//",
    ]
    if not re.search(r"[&;#\s]", password):  # otherwise the query would end the value there
        found.append(f"postgresql://pulse@db/pulse?password={password}&sslmode=require")
    return found


def assert_no_piece_shown(shown: str, skeleton: str, password: str) -> None:
    """No piece of the password in `shown` beyond what `skeleton` (the same text with every
    password form masked) holds anyway."""
    for form in printed_forms(password):
        for length in range(SHORTEST, len(form) + 1):
            for start in range(len(form) - length + 1):
                piece = form[start:start + length]
                assert piece not in shown or piece in skeleton, f"{piece!r} of {form!r} shown in {shown!r}"


TEMPLATES = ["cannot connect to {url}: refused", "connect {url} failed; AUTH {form} refused",
             'password authentication failed for "{form}"']


def pick(password: str, url_index: int, form_index: int) -> tuple[str, str]:
    found, forms = urls(password), sorted(printed_forms(password))
    return found[url_index % len(found)], forms[form_index % len(forms)]


# Leaks this test found, kept so that every run (CI's fixed examples too) checks them: a password
# printed form-encoded on its own (quote_plus), and a raw `A://` taken for the start of a second URL.
PLUS = sorted(printed_forms("0; 0")).index(quote_plus("0; 0"))


@example(password="0; 0", url_index=0, form_index=PLUS, template=TEMPLATES[1])
@example(password="A://", url_index=1, form_index=0, template=TEMPLATES[0])
@settings(max_examples=150, deadline=None)
@given(password=passwords, url_index=st.integers(0, 20), form_index=st.integers(0, 5),
       template=st.sampled_from(TEMPLATES))
def test_no_piece_of_a_password_survives_in_a_message_or_log_line(
    password: str, url_index: int, form_index: int, template: str
) -> None:
    url, form = pick(password, url_index, form_index)
    message = template.format(url=url, form=form)
    skeleton_url = url
    for each in sorted(printed_forms(password), key=len, reverse=True):
        skeleton_url = skeleton_url.replace(each, MASK)
    skeleton = template.format(url=skeleton_url, form=MASK)
    assert_no_piece_shown(redact_url(url), skeleton, password)
    assert_no_piece_shown(redact_text(message, url), skeleton, password)
    for log_format in ("text", "kv", "json"):
        # The line's own words (level, logger, time) may hold a piece by chance: they are
        # allowed as the same line without the password shows them.
        line, skeleton_line = (make_formatter(log_format, secret_urls=[url]).format(log_record(text))
                               for text in (message, skeleton))
        assert_no_piece_shown(line, skeleton_line, password)


def log_record(message: str) -> logging.LogRecord:
    record = logging.LogRecord("pool", logging.ERROR, __file__, 1, "%s", (message,), None)
    record.created, record.msecs = 1_700_000_000.0, 0.0
    return record
