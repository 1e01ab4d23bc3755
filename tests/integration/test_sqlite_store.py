"""What only the SQLite store does: the text it stores for a timestamp, and a missing file."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime

import pytest

from pool.errors import ConfigError
from pool.store import open_store
from tests.helpers import make_settings


def stored_timestamps(path: str) -> list[str]:
    with sqlite3.connect(path) as conn:
        return [r[0] for r in conn.execute("SELECT timestamp FROM signals ORDER BY id")]


def test_seeded_timestamps_are_stored_as_iso_8601_text_and_text_as_given(tmp_path) -> None:
    path = str(tmp_path / "signals.db")
    store = open_store(make_settings(db_url=f"sqlite:///{path}"))
    try:
        store.init_schema()
        store.insert_signals([
            {"name": "a", "value": 1.0, "source": "s", "timestamp": datetime(2026, 1, 2, 3, 4, 5, 6, UTC)},
            {"name": "b", "value": 2.0, "source": "s", "timestamp": "2026-01-02 03:04:05"},
        ])
    finally:
        store.close()
    # ISO-8601 with its T, not sqlite3's deprecated default adapter's 'YYYY-MM-DD HH:MM:SS'.
    assert stored_timestamps(path) == ["2026-01-02T03:04:05.000006+00:00", "2026-01-02 03:04:05"]


def test_a_sqlite_url_naming_a_missing_file_is_a_configuration_error_and_creates_nothing(tmp_path) -> None:
    path = tmp_path / "missing.db"
    store = open_store(make_settings(db_url=f"sqlite:///{path}"))
    try:
        with pytest.raises(ConfigError, match="does not exist"):
            store.check_schema()
    finally:
        store.close()
    assert not path.exists()


def test_a_row_of_invalid_utf8_is_claimed_with_its_batch_and_its_bytes_kept(tmp_path) -> None:
    # Decoding strictly would fail the whole batch's fetch, every time: no row of it would go out.
    path = str(tmp_path / "signals.db")
    store = open_store(make_settings(db_url=f"sqlite:///{path}"))
    try:
        store.init_schema()
        with sqlite3.connect(path) as conn:
            conn.execute("INSERT INTO signals (name, value, source, timestamp) VALUES"
                         " (CAST(x'ff41' AS TEXT), 1.0, 's', '2026-01-02T03:04:05'),"
                         " ('ok', 2.0, 's', '2026-01-02T03:04:05')")
        claim = store.claim("me", 1, 0, 10, 30)
    finally:
        store.close()
    assert [(r.id, r.name) for r in claim.rows] == [(1, "\udcffA"), (2, "ok")]
