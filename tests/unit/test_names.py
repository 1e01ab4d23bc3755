"""Names derived from the table name: short enough for PostgreSQL, never shared by two tables."""

from __future__ import annotations

import random
import string

import pytest

from pool.config import IDENTIFIER
from pool.errors import ConfigError
from pool.store.names import MAX_IDENTIFIER_BYTES, SUFFIXES, check_table_name, derived_name

FIRST = string.ascii_letters + "_"
REST = string.ascii_letters + string.digits + "_"


def random_name(rng: random.Random, length: int) -> str:
    return rng.choice(FIRST) + "".join(rng.choice(REST) for _ in range(length - 1))


def table_pairs(count: int, seed: int = 10) -> list[tuple[str, str]]:
    """Pairs of distinct valid table names, most of them sharing a long prefix (the reported
    collision), some differing only in case or only in their last character."""
    rng = random.Random(seed)
    pairs = []
    while len(pairs) < count:
        kind = rng.randrange(4)
        if kind == 0:
            a, b = random_name(rng, rng.randint(1, 63)), random_name(rng, rng.randint(1, 63))
        elif kind == 1:
            prefix = random_name(rng, rng.randint(30, 62))
            a = prefix + "".join(rng.choice(REST) for _ in range(rng.randint(0, 63 - len(prefix))))
            b = prefix + "".join(rng.choice(REST) for _ in range(rng.randint(0, 63 - len(prefix))))
        elif kind == 2:
            a = random_name(rng, rng.randint(40, 63))
            b = a[:-1] + rng.choice(REST)
        else:
            a = random_name(rng, rng.randint(1, 63))
            b = a.swapcase()
        try:
            check_table_name(a)
            check_table_name(b)
        except ConfigError:
            continue
        if a != b and IDENTIFIER.match(a) and IDENTIFIER.match(b):
            pairs.append((a, b))
    return pairs


def names_of(table: str, fold_case: bool) -> set[str]:
    """Everything one pool creates or uses in the table's namespace, the table itself included."""
    derived = {derived_name(table, suffix, fold_case) for suffix in SUFFIXES}
    assert len(derived) == len(SUFFIXES), f"two objects of {table!r} share a name"
    return derived | {table}


@pytest.mark.parametrize("fold_case", [False, True], ids=["postgresql", "sqlite"])
def test_two_distinct_tables_never_share_a_derived_name(fold_case):
    for a, b in table_pairs(20_000):
        for name in names_of(a, fold_case) | names_of(b, fold_case):
            assert len(name.encode()) <= MAX_IDENTIFIER_BYTES, name
        if fold_case:
            if a.lower() == b.lower():
                # One table to SQLite: it must get the very same objects, however it is spelled.
                assert {n.lower() for n in names_of(a, True)} == {n.lower() for n in names_of(b, True)}
                continue
            shared = {n.lower() for n in names_of(a, True)} & {n.lower() for n in names_of(b, True)}
        else:
            shared = names_of(a, False) & names_of(b, False)
        assert not shared, (a, b, shared)


def test_the_reported_pair_gets_two_sets_of_names():
    prefix = "sensor_readings_from_the_north_sea_platform_array_"
    a, b = prefix + "alpha", prefix + "bravo"
    for fold_case in (False, True):
        assert not names_of(a, fold_case) & names_of(b, fold_case)


def test_short_table_names_keep_the_names_existing_deployments_have():
    assert derived_name("signals", "pool_pending", False) == "signals_pool_pending"
    assert derived_name("signals", "pool_members", True) == "signals_pool_members"
    table = "t" * (MAX_IDENTIFIER_BYTES - len("_pool_members"))  # the longest that still fits
    assert derived_name(table, "pool_members", False) == f"{table}_pool_members"


@pytest.mark.parametrize("table", ["signals_pool_meta", "x_pool_shards", "Signals_POOL_MEMBERS",
                                   "a_pool_pending_0123456789ab", "b_pool_notify"])
def test_a_table_named_like_a_derived_name_is_refused_in_one_line(table):
    with pytest.raises(ConfigError, match="ends like the relay's own tables") as caught:
        check_table_name(table)
    assert "\n" not in str(caught.value)
