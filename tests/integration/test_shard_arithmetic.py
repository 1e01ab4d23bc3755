"""The database maps every id to the shard Python's shard_of says: negative, zero and huge ids too.

A row whose shard the database computes outside 0..S-1 is held by no poller and never relayed,
so both the claim and the per-shard backlog are checked against the Python definition."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from sqlalchemy import text

from pool.store import open_store
from pool.store.base import shard_of
from tests.helpers import make_settings

BIGINT_MIN, BIGINT_MAX = -(2**63), 2**63 - 1
EDGES = [BIGINT_MIN, BIGINT_MIN + 1, -(2**53) - 1, -65, -64, -63, -3, -2, -1, 0, 1, 2, 3, 63, 64, 65,
         2**31 - 1, 2**31, 2**53 + 1, BIGINT_MAX - 1, BIGINT_MAX]
# A fixed seed: the sample is the same on every run, so a failure can be replayed.
_rng = random.Random(20261201)
SAMPLE = [_rng.randint(BIGINT_MIN, BIGINT_MAX) for _ in range(200)]
IDS = sorted(set(EDGES + SAMPLE))


@pytest.fixture(params=["postgresql", "sqlite"])
def store(request):
    url = request.getfixturevalue("pg_url" if request.param == "postgresql" else "sqlite_url")
    store = open_store(make_settings(db_url=url))
    store.init_schema()
    with store.engine.begin() as conn:
        conn.execute(text("INSERT INTO signals (id, name, value, source) VALUES (:id, 'n', 1.0, 's')"),
                     [{"id": i} for i in IDS])
    yield store
    store.close()


def test_python_shard_of_is_always_in_range() -> None:
    for count in (1, 2, 3, 7, 64, 1000):
        assert all(0 <= shard_of(i, count) < count for i in IDS)


@pytest.mark.parametrize("shard_count", [1, 3, 64, 1000])
def test_claim_and_backlog_put_every_id_on_its_python_shard(store, shard_count: int) -> None:
    expected = {shard: sorted(i for i in IDS if shard_of(i, shard_count) == shard)
                for shard in range(shard_count)}
    stats = store.backlog_stats(shard_count)
    assert stats.by_shard == {shard: len(ids) for shard, ids in expected.items()}
    assert stats.backlog == len(IDS)
    claimed = Counter()
    for shard in range(shard_count):
        if not expected[shard]:
            continue
        claim = store.claim("prop", shard_count, shard, len(IDS) + 1, 60)
        assert [r.id for r in claim.rows] == expected[shard], shard
        claimed.update(r.id for r in claim.rows)
    assert sorted(claimed) == IDS  # every id claimed, each exactly once
