"""Passwords in database and broker URLs never reach logs, errors or metrics."""

from __future__ import annotations

import pytest

from pool.redact import redact_text, redact_url

WITH_PASSWORD = [
    (
        "postgresql://pulse:s3cret@db.example.com:5432/pulse",
        "postgresql://pulse:***@db.example.com:5432/pulse",
    ),
    ("postgresql+psycopg://pulse:s3cret@db/pulse", "postgresql+psycopg://pulse:***@db/pulse"),
    ("postgres://pulse:s3cret@db/pulse?sslmode=require", "postgres://pulse:***@db/pulse?sslmode=require"),
    ("postgresql://pulse:s3cret@[::1]:5432/pulse", "postgresql://pulse:***@[::1]:5432/pulse"),
    ("postgresql://pulse:p%40ss%2Fw0rd@db/pulse", "postgresql://pulse:***@db/pulse"),
    ("amqp://guest:s3cret@rabbit:5672//", "amqp://guest:***@rabbit:5672//"),
    ("amqps://user:s3cret@rabbit/vhost", "amqps://user:***@rabbit/vhost"),
    ("pyamqp://user:s3cret@rabbit//", "pyamqp://user:***@rabbit//"),
    ("redis://user:s3cret@cache:6379/0", "redis://user:***@cache:6379/0"),
    ("redis://:s3cret@cache:6379/0", "redis://:***@cache:6379/0"),
    ("redis://:s3cret@cache", "redis://:***@cache"),
    ("rediss://:s3cret@cache:6380/1", "rediss://:***@cache:6380/1"),
]

WITHOUT_PASSWORD = [
    "sqlite:///pulse_signals.db",
    "sqlite:////var/lib/pulse/signals.db",
    "postgresql://db.example.com/pulse",
    "postgresql://pulse@db.example.com/pulse",
    "postgresql://db:5432/pulse",
    "amqp://rabbit:5672//",
    "redis://cache:6379/0",
    "redis://localhost",
    "filesystem://",
    "memory://",
    "",
]


@pytest.mark.parametrize(("url", "expected"), WITH_PASSWORD)
def test_redact_url_hides_the_password(url: str, expected: str) -> None:
    redacted = redact_url(url)
    assert redacted == expected
    assert "s3cret" not in redacted
    assert "p%40ss" not in redacted


@pytest.mark.parametrize("url", WITHOUT_PASSWORD)
def test_redact_url_leaves_urls_without_password_alone(url: str) -> None:
    assert redact_url(url) == url


@pytest.mark.parametrize(("url", "_expected"), WITH_PASSWORD)
def test_redact_url_is_idempotent(url: str, _expected: str) -> None:
    once = redact_url(url)
    assert redact_url(once) == once


def test_redact_url_handles_several_urls_in_one_string() -> None:
    text = "db=postgresql://a:one@db/x broker=redis://:two@cache/0"
    assert redact_url(text) == "db=postgresql://a:***@db/x broker=redis://:***@cache/0"


@pytest.mark.parametrize(("url", "expected"), WITH_PASSWORD)
def test_redact_text_replaces_the_url_inside_a_message(url: str, expected: str) -> None:
    message = f"OperationalError: cannot connect to {url}: Connection refused"
    redacted = redact_text(message, url)
    assert redacted == f"OperationalError: cannot connect to {expected}: Connection refused"


def test_redact_text_hides_a_bare_password() -> None:
    url = "amqp://relay:Tr0ub4dor@rabbit:5672//"
    message = "AccessRefused: login refused for user relay with password Tr0ub4dor"
    redacted = redact_text(message, url)
    assert "Tr0ub4dor" not in redacted
    assert "user relay" in redacted


def test_redact_text_hides_the_password_of_a_redis_url_without_user() -> None:
    url = "redis://:hunter2@cache:6379/0"
    message = f"Error 111 connecting to {url}. AUTH hunter2 failed."
    redacted = redact_text(message, url)
    assert "hunter2" not in redacted
    assert "redis://:***@cache:6379/0" in redacted


def test_redact_text_with_several_urls() -> None:
    db, broker = "postgresql://u:dbpass@db/x", "redis://:brokerpass@cache/0"
    redacted = redact_text(f"{db} and {broker}", db, broker)
    assert "dbpass" not in redacted and "brokerpass" not in redacted
    assert redacted == "postgresql://u:***@db/x and redis://:***@cache/0"


@pytest.mark.parametrize("url", WITHOUT_PASSWORD)
def test_redact_text_leaves_messages_alone_without_password(url: str) -> None:
    message = f"cannot reach {url}: timed out (user pulse)"
    assert redact_text(message, url) == message


def test_redact_text_without_urls_is_identity() -> None:
    assert redact_text("nothing secret here") == "nothing secret here"


def test_redact_text_with_url_absent_from_message_is_identity() -> None:
    assert redact_text("connection refused", "postgresql://u:pw123@db/x") == "connection refused"


def test_password_containing_a_slash_is_hidden() -> None:
    url = "postgresql://pulse:ab/cd@db/pulse"
    assert "ab/cd" not in redact_url(url)
    assert "ab/cd" not in redact_text(f"cannot reach {url}", url)


@pytest.mark.parametrize(("url", "password"), [
    ("postgresql://u:p@ss@127.0.0.1/db?application_name=a@b", "p@ss"),
    ("postgresql://u:p?w@d@127.0.0.1/db?application_name=a@b?c", "p?w@d"),
    ("postgresql://u:p:s@w@127.0.0.1/db?application_name=a@b", "p:s@w"),
])
def test_a_password_with_an_at_sign_is_hidden_alone_when_the_query_holds_one_too(
    url: str, password: str,
) -> None:
    # The password runs to the last `@`, here the query's; a parser that ends the authority at
    # the first `?` after the userinfo takes it to the last `@` before that `?` instead, and a
    # driver may then quote that shorter password on its own.
    message = f"password authentication failed: {password!r} rejected"
    assert redact_text(message, url) == "password authentication failed: '***' rejected"


@pytest.mark.parametrize("url", ["postgresql://u:@127.0.0.1/db", "redis://127.0.0.1/0?password="])
def test_an_empty_password_hides_nothing_else(url: str) -> None:
    # An empty secret must not be "hidden": replacing "" would put *** between every character.
    assert redact_text("connection refused", url) == "connection refused"


def test_the_secrets_of_every_url_given_are_hidden() -> None:
    database, broker = "postgresql://u:db-pw@127.0.0.1/x", "amqp://guest:mq-pw@127.0.0.1//"
    assert redact_text("tried db-pw, then mq-pw", database, broker) == "tried ***, then ***"


def test_a_secret_holding_another_is_hidden_whole() -> None:
    # "zz" inside "azz": hiding the shorter one first would leave "a***" behind.
    assert redact_text("token azz refused", "redis://:zz@127.0.0.1/0?token=azz") == "token *** refused"


def test_a_configured_url_whose_password_looks_like_a_url_is_redacted_as_one_url() -> None:
    # Inside a message `pa://` would start another URL; a configured URL is one URL whatever it holds.
    url = "redis://:pa://ss@cache/0"
    assert redact_url(url) == "redis://:***@cache/0"
    assert redact_text("AUTH pa://ss refused", url) == "AUTH *** refused"


def test_a_configured_url_with_a_trailing_newline_still_has_its_password_hidden() -> None:
    # As read from a file: not one URL any more (the newline), so the URL is found inside it.
    assert redact_text("AUTH s3cret refused", "redis://:s3cret@cache/0\n") == "AUTH *** refused"


def test_a_form_encoded_password_is_hidden_when_printed_fully_percent_encoded() -> None:
    # `a+b%2Fc` form-decodes to `a b/c`, which a driver may print as `a%20b%2Fc`.
    assert redact_text("AUTH a%20b%2Fc refused", "redis://:a+b%2Fc@cache/0") == "AUTH *** refused"


def test_a_password_is_hidden_in_the_url_as_sqlalchemy_renders_it() -> None:
    from sqlalchemy.engine import make_url

    url = "postgresql://u:p%20w%2Bd%2Fx@db/x"  # the password is `p w+d/x`
    rendered = make_url(url).render_as_string(hide_password=False)
    assert rendered == "postgresql://u:p w+d%2Fx@db/x"  # space and + as they are
    assert redact_text(f"cannot connect to {rendered}: refused", url) == (
        "cannot connect to postgresql://u:***@db/x: refused")
