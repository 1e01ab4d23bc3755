"""Names derived from a table name, for any table names (property tests): two distinct tables
never share a derived name, every name fits PostgreSQL's 63 bytes, and derivation is stable."""

from __future__ import annotations

import os
import subprocess
import sys

from hypothesis import Phase, assume, given, settings
from hypothesis import strategies as st

from pool.config import IDENTIFIER
from pool.errors import ConfigError
from pool.store.names import MAX_IDENTIFIER_BYTES, SUFFIXES, check_table_name, derived_name

FIRST = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_"
REST = FIRST + "0123456789"


def accepted(table: str) -> bool:
    """PULSE_DB_TABLE takes this name: a plain identifier, not named like a derived name."""
    try:
        check_table_name(table)
    except ConfigError:
        return False
    return bool(IDENTIFIER.match(table))


# Valid names of every length, long ones most often (those are hashed), and names built to share
# a long prefix, to end like a suffix, or to differ only in case or in their last character.
tables = st.builds(lambda first, rest: first + rest, st.sampled_from(FIRST),
                   st.text(st.sampled_from(REST), max_size=62)).filter(accepted)
long_tables = st.builds(lambda first, rest: first + rest, st.sampled_from(FIRST),
                        st.text(st.sampled_from(REST), min_size=53, max_size=62)).filter(accepted)


@st.composite
def table_pairs(draw: st.DrawFn) -> tuple[str, str]:
    a = draw(st.one_of(tables, long_tables))
    kind = draw(st.sampled_from(["any", "prefix", "case", "last", "suffix-like"]))
    if kind == "any":
        b = draw(tables)
    elif kind == "prefix":
        b = a[: draw(st.integers(1, len(a)))] + draw(st.text(st.sampled_from(REST), max_size=63))
    elif kind == "case":
        b = "".join(c.swapcase() if draw(st.booleans()) else c for c in a)
    elif kind == "last":
        b = a[:-1] + draw(st.sampled_from(REST))
    else:  # a's own derived name, a digit off: refused or distinct
        b = derived_name(a, draw(st.sampled_from(SUFFIXES)), False)[:-1] + draw(st.sampled_from(REST))
    b = b[:63]
    assume(a != b and accepted(b))
    return a, b


def names_of(table: str, fold_case: bool) -> set[str]:
    derived = {derived_name(table, suffix, fold_case) for suffix in SUFFIXES}
    assert len(derived) == len(SUFFIXES), f"two objects of {table!r} share a name"
    return derived | {table}


@settings(max_examples=150)
@given(pair=table_pairs())
def test_distinct_tables_never_share_a_name_and_every_name_fits(pair: tuple[str, str]) -> None:
    a, b = pair
    for fold_case in (False, True):
        for name in names_of(a, fold_case) | names_of(b, fold_case):
            assert len(name.encode()) <= MAX_IDENTIFIER_BYTES, name
    # PostgreSQL: names compare exactly (the relay quotes them).
    assert not names_of(a, False) & names_of(b, False)
    # SQLite compares names without regard to case: `Signals` and `signals` are one table and
    # must get the very same objects; tables that differ otherwise share none.
    folded_a = {n.lower() for n in names_of(a, True)}
    folded_b = {n.lower() for n in names_of(b, True)}
    if a.lower() == b.lower():
        assert folded_a == folded_b
    else:
        assert not folded_a & folded_b


DERIVE = """
import sys
from pool.store.names import SUFFIXES, derived_name
for table in sys.stdin.read().split():
    print(" ".join(derived_name(table, s, f) for s in SUFFIXES for f in (False, True)))
"""


# No shrinking: each step would start the process again. The assertion names the table.
@settings(max_examples=1, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate])
# Long names (every derived name hashed). Unique: hypothesis's first batch would be one name 100 times.
@given(batch=st.lists(long_tables, min_size=100, max_size=100, unique=True))
def test_derivation_is_the_same_in_another_process(batch: list[str]) -> None:
    # Every poller, `pool init-db` and `pool status` derive the names on their own.
    done = subprocess.run([sys.executable, "-c", DERIVE], input="\n".join(batch), capture_output=True,
                          text=True, check=True, env={**os.environ, "PYTHONHASHSEED": "7"})
    here = [" ".join(derived_name(t, s, f) for s in SUFFIXES for f in (False, True)) for t in batch]
    for table, there, ours in zip(batch, done.stdout.splitlines(), here, strict=True):
        assert there == ours, f"{table!r} gets other names in another process"
