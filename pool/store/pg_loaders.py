"""psycopg loaders that never raise: a value Python cannot hold becomes an `Unreadable` marker.

PostgreSQL stores values no Python type can hold: `infinity` and years past 9999 or before 1
in date and timestamp columns, `24:00` times, JSON nested deeper than Python's recursion
limit. psycopg raises on such a value while it reads a claim's rows, after the claim has
committed, so the whole batch stayed leased and was claimed and lost again at every lease
expiry. The store reads such a batch again through these loaders (`PostgresStore._claim_rows`),
and the payload then rejects the unreadable row alone.

They serve only that second read: wrapping a C loader in a Python call doubled the cost of
loading a timestamptz (measured 0.64 -> 1.44 us per value), on every row of every claim.
"""

from __future__ import annotations

import functools
from typing import Any

from psycopg.adapt import AdaptersMap, Buffer, Loader
from psycopg.pq import Format

from pool.store.base import Unreadable


@functools.cache
def tolerant_loader(stock: type[Loader]) -> type[Loader]:
    """A loader that loads as `stock` does, and returns an Unreadable where `stock` raises."""

    class Tolerant(Loader):
        format = stock.format
        wraps = stock

        def __init__(self, oid: int, context: Any = None) -> None:
            super().__init__(oid, context)
            self._stock_load = stock(oid, context).load

        def load(self, data: Buffer) -> Any:
            try:
                return self._stock_load(data)
            except Exception as exc:  # noqa: BLE001 - whatever the reason, only this value is lost
                return Unreadable(_as_text(data, self.format), _reason(exc))

    Tolerant.__name__ = Tolerant.__qualname__ = f"Tolerant{stock.__name__}"
    return Tolerant


def register_tolerant_loaders(adapters: AdaptersMap) -> None:
    """Wrap every loader these adapters know (a cursor's, say), in both formats. Types with no
    loader of their own are read as text, which cannot fail on a UTF-8 connection and comes as
    bytes on an SQL_ASCII one."""
    for info in adapters.types:
        for oid in (info.oid, info.array_oid):
            for fmt in (Format.TEXT, Format.BINARY):
                stock = adapters.get_loader(oid, fmt) if oid else None
                if stock is not None and not hasattr(stock, "wraps"):  # never wrapped twice
                    adapters.register_loader(oid, tolerant_loader(stock))


def _as_text(data: Buffer, fmt: Format) -> str:
    raw = bytes(data)
    return raw.decode("utf-8", "replace") if fmt == Format.TEXT else f"0x{raw.hex()}"


def _reason(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
