"""Names of what the relay creates beside a signals table: indexes, shard tables, trigger.

`<table>_<suffix>` while that fits PostgreSQL's 63-byte identifiers, the names existing
deployments already have. A longer table gets `<first 37 characters>_<suffix>_<12 hex digits>`,
the digits hashing the whole table name: PostgreSQL would cut `<table>_<suffix>` short, and two
tables sharing their first 50 characters would share one set of shard tables and indexes.

Why two tables never share a name: suffixes differ from each other, so the names of one table
differ; a short name ends in `_<suffix word>` (at most 7 characters after its last `_`), a long
one in `_<12 hex digits>`, so a short name is never a long one; short names of two tables differ
as the tables do; long names of two tables differ by their hash (48 bits) or their stem. A table
may not itself be named like a derived name (check_table_name), so no table is another's index.
"""

from __future__ import annotations

import hashlib
import re

from pool.errors import ConfigError

MAX_IDENTIFIER_BYTES = 63  # PostgreSQL's NAMEDATALEN - 1; it truncates longer names silently
HASH_DIGITS = 12
SUFFIXES = ("pool_pending", "pool_dead", "pool_meta", "pool_shards", "pool_members", "pool_notify")
_LONGEST_SUFFIX = max(len(s) for s in SUFFIXES)
STEM_CHARACTERS = MAX_IDENTIFIER_BYTES - 1 - _LONGEST_SUFFIX - 1 - HASH_DIGITS  # 37
_DERIVED = re.compile(
    rf"_(?:{'|'.join(SUFFIXES)})(?:_[0-9a-f]{{{HASH_DIGITS}}})?$", re.IGNORECASE
)


def derived_name(table: str, suffix: str, fold_case: bool) -> str:
    """The name of `table`'s object `suffix` (one of SUFFIXES).

    `fold_case`: the database compares names without regard to case (SQLite), so `Signals`
    and `signals` are one table and must get one set of names."""
    if suffix not in SUFFIXES:
        raise ValueError(f"unknown suffix {suffix!r}")
    short = f"{table}_{suffix}"
    if len(short.encode()) <= MAX_IDENTIFIER_BYTES:
        return short
    key = table.lower() if fold_case else table
    digest = hashlib.sha256(key.encode()).hexdigest()[:HASH_DIGITS]
    return f"{table[:STEM_CHARACTERS]}_{suffix}_{digest}"


def check_table_name(table: str) -> None:
    """Refuse a signals table named like one of the relay's own objects: another table's
    shard tables or indexes would then be this very table."""
    if _DERIVED.search(table):
        raise ConfigError(
            f"table name {table!r} ends like the relay's own tables and indexes"
            f" (_{'/_'.join(SUFFIXES)}); choose another PULSE_DB_TABLE"
        )
