"""No printed form of a URL holds its password, whatever the password and however it is written:
userinfo with unencoded @ : / ? #, percent-encoded, in the query, unicode, or in a URL no parser
reads. Property-style: many generated passwords, every form a user can give."""

from __future__ import annotations

import logging
import random
from urllib.parse import quote

import pytest

from pool.config import load_settings
from pool.errors import ConfigError
from pool.logs import make_formatter
from pool.redact import redact_text, redact_url

ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789@:/?#%&=+!$*;,.~-_[]'\"éü€漢😀"


def passwords(count: int = 400, seed: int = 10) -> list[str]:
    rng = random.Random(seed)
    found = ["p@ss:w/rd?#%", "@@@@@@@@", "::::::::", "%40%3A%2F", "пароль-секрет", "a b c d e f"]
    while len(found) < count:
        found.append("".join(rng.choice(ALPHABET) for _ in range(rng.randint(8, 24))))
    return found


def forms(password: str) -> list[str]:
    """URLs a user could write holding `password`."""
    encoded = quote(password, safe="")
    raw = password.replace(" ", "%20")  # an unencoded space ends a URL in any message
    return [
        f"postgresql://pulse:{encoded}@db.example.com:5432/pulse",
        f"postgresql://pulse:{raw}@db.example.com:5432/pulse",
        f"postgresql+psycopg://pulse:{raw}@db/pulse?sslmode=require",
        f"postgresql://pulse@db/pulse?password={encoded}&sslmode=require",
        f"postgresql://db/pulse?sslmode=require&sslpassword={encoded}",
        f"redis://:{raw}@cache:6379/0",
        f"redis://:{encoded}@cache:6379/0",
        f"redis://cache:6379/0?password={encoded}",
        f"rediss://user:{raw}@cache:6380/1?ssl_cert_reqs=none",
        f"amqp://relay:{raw}@rabbit:5672//",
        f"amqps://relay:{encoded}@rabbit/vhost?token={encoded}",
        f"redis://:{raw}@127.0.0.1:notaport/5",
        f"postgresql://pulse:{raw}@[::1/pulse",
    ]


def shown_forms(password: str) -> set[str]:
    """How the password could appear in text: as given, percent-encoded, or decoded."""
    return {password, quote(password, safe=""), password.replace(" ", "%20")}


def assert_hidden(text: str, password: str) -> None:
    for form in shown_forms(password):
        assert form not in text, f"{form!r} shown in {text!r}"


@pytest.mark.parametrize("password", passwords())
def test_no_printed_form_of_a_url_holds_its_password(password: str) -> None:
    for url in forms(password):
        assert_hidden(redact_url(url), password)
        assert_hidden(redact_url(f"cannot connect to {url}: refused"), password)
        # A driver that quotes the password on its own, decoded or not.
        for leaked in shown_forms(password):
            assert_hidden(redact_text(f"connect {url} failed; AUTH {leaked} refused", url), password)


@pytest.mark.parametrize("password", passwords(60, seed=11))
def test_configuration_errors_and_log_lines_hide_the_password(password: str) -> None:
    formatter = make_formatter("text", secret_urls=forms(password))
    for url in forms(password):
        for key in ("db_url", "broker_url"):
            try:
                load_settings(environ={}, overrides={key: url, "table": "bad table"})
            except ConfigError as exc:
                assert_hidden(str(exc), password)
        record = logging.LogRecord("pool", logging.ERROR, __file__, 1, "cannot reach %s (%s)",
                                   (url, password), None)
        assert_hidden(formatter.format(record), password)


def test_a_query_password_is_hidden_and_the_rest_of_the_url_kept() -> None:
    assert redact_url("postgresql://db/x?sslmode=require&password=s3cret&application_name=relay") == (
        "postgresql://db/x?sslmode=require&password=***&application_name=relay")


def test_a_password_with_an_unencoded_at_sign_is_hidden_whole() -> None:
    assert redact_url("redis://:p@ss@cache:6379/0") == "redis://:***@cache:6379/0"
