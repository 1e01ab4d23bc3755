"""The database puts every id on the shard Python's shard_of says, for any id and shard count
(property tests). A row the database maps outside 0..S-1, or to another shard than the share
computation expects, is claimed by no poller and never relayed. One query per example checks a
whole list of ids."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from pool.config import NUMBER_RANGES
from pool.store import open_store
from pool.store.base import shard_of
from tests.helpers import make_settings

BIGINT = st.integers(-(2**63), 2**63 - 1)
INTEGER = st.integers(-(2**31), 2**31 - 1)
# A NUMERIC id column holds whole numbers past BIGINT too.
NUMERIC = st.integers(-(10**30), 10**30)
EDGES = st.sampled_from([-(2**63), -(2**63) + 1, -(2**31), -1, 0, 1, 2**31 - 1, 2**63 - 1])
MAX_SHARDS = int(NUMBER_RANGES["shards"][2])
# Every shard count PULSE_SHARDS accepts. (Past 2**30, far beyond it, `(id % n) + n` would
# overflow an INTEGER id column on PostgreSQL.)
SHARD_COUNTS = st.integers(1, MAX_SHARDS)


# SQLite has one integer type (64-bit); PostgreSQL id columns may be any of three.
CASES = [("postgresql", "bigint"), ("postgresql", "integer"), ("postgresql", "numeric"),
         ("sqlite", "integer")]


@pytest.fixture
def store(request):
    url = request.getfixturevalue("pg_url" if request.param == "postgresql" else "sqlite_url")
    store = open_store(make_settings(db_url=url))
    yield store
    store.close()


def shards_in_sql(store, ids: list[int], shard_count: int, column_type: str) -> dict[int, int]:
    """id -> the shard the store's own shard expression gives it, for ids in a column of this type."""
    c_id = store.c_id
    if store.engine.dialect.name == "postgresql":
        # Passed as text: the cast, not the driver, gives the ids the column's type.
        source = f"unnest(CAST(CAST(:ids AS text[]) AS {column_type}[])) AS t({c_id})"
        ids_param: object = [str(i) for i in ids]
    else:
        source = f"(SELECT value AS {c_id} FROM json_each(:ids))"
        ids_param = "[" + ",".join(str(i) for i in ids) + "]"
    sql = text(f"SELECT {c_id}, {store.shard_expr('n')} FROM {source}")
    with store.engine.connect() as conn:
        return {int(i): int(s) for i, s in conn.execute(sql, {"ids": ids_param, "n": shard_count})}


@pytest.mark.parametrize(("store", "column_type"), CASES, indirect=["store"],
                         ids=[" ".join(case) for case in CASES])
def test_the_database_puts_every_id_on_its_python_shard(store, column_type: str) -> None:
    sqlite = store.engine.dialect.name == "sqlite"
    values = {"bigint": BIGINT, "integer": BIGINT if sqlite else INTEGER,
              "numeric": st.one_of(NUMERIC, BIGINT)}[column_type]
    in_range = EDGES.filter(lambda i: sqlite or column_type != "integer" or -(2**31) <= i < 2**31)

    @settings(max_examples=40, deadline=None)
    @given(ids=st.lists(st.one_of(values, in_range), min_size=1, max_size=100, unique=True),
           shard_count=SHARD_COUNTS)
    def check(ids: list[int], shard_count: int) -> None:
        found = shards_in_sql(store, ids, shard_count, column_type)
        assert found == {i: shard_of(i, shard_count) for i in ids}
        assert all(0 <= shard < shard_count for shard in found.values())

    check()
