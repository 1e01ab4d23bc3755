"""Shares for any member set: every shard wanted by exactly one live member, whatever the names,
their order, duplicates in the list, and each member's process and hash seed (property tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from pool.shards import desired_shards

# Member names as a database hands them back: any text (pool's own are "<host>/<slot>/<nonce>",
# but the split must not depend on that), including names that differ only in case or unicode
# normalisation, which sort apart but might compare equal under a careless key.
names = st.one_of(
    st.text(min_size=1, max_size=12),
    st.builds(lambda h, s, n: f"{h}/poller-{s}/{n:08x}", st.sampled_from(["a", "A", "b", "é", "e\u0301"]),
              st.integers(0, 3), st.integers(0, 2**32 - 1)),
)
member_sets = st.lists(names, min_size=1, max_size=12, unique=True)
shard_counts = st.integers(min_value=1, max_value=300)


def assert_a_partition(shares: dict[str, list[int]], shard_count: int) -> None:
    wanted = sorted(s for share in shares.values() for s in share)
    assert wanted == list(range(shard_count)), f"a shard wanted by no member or by two: {shares}"
    sizes = [len(share) for share in shares.values()]
    assert max(sizes) - min(sizes) <= 1, f"unbalanced shares: {shares}"


@settings(max_examples=60)
@given(members=member_sets, shard_count=shard_counts, data=st.data())
def test_every_shard_is_wanted_by_exactly_one_member_whatever_order_each_member_sees(
    members: list[str], shard_count: int, data: st.DataObject
) -> None:
    shares = {}
    for me in members:
        # Each member reads the list in an order of its own, with repeats, and may not be in it yet
        # (a poller counts itself in before its first heartbeat lands).
        repeats = members[: data.draw(st.integers(0, len(members)))]
        seen = data.draw(st.permutations([*members, *repeats]))
        if data.draw(st.booleans()):
            seen = [m for m in seen if m != me]
        shares[me] = desired_shards(seen, me, shard_count)
    assert_a_partition(shares, shard_count)


@st.composite
def reordered(draw: st.DrawFn) -> tuple[list[str], list[str]]:
    """A member list, and the same members in another order with some of them repeated."""
    members = draw(member_sets)
    repeats = members[: draw(st.integers(0, len(members)))]
    return members, draw(st.permutations(members + repeats))


@settings(max_examples=60)
@given(lists=reordered(), shard_count=shard_counts)
def test_a_share_does_not_depend_on_the_order_or_repeats_of_the_member_list(
    lists: tuple[list[str], list[str]], shard_count: int
) -> None:
    members, shuffled = lists
    for me in members:
        assert desired_shards(shuffled, me, shard_count) == desired_shards(members, me, shard_count)


SHARES_IN_A_PROCESS = """
import json, sys
from pool.shards import desired_shards
cases, process, processes = json.load(sys.stdin), int(sys.argv[1]), int(sys.argv[2])
# This process computes the shares of every member it is host to, as a poller would: from a set.
print(json.dumps([{me: desired_shards(set(members), me, count)
                   for i, me in enumerate(members) if i % processes == process}
                  for members, count in cases]))
"""
PROCESSES = 3


# No shrinking: each step would start the processes again. The assertion names the failing case.
@settings(max_examples=2, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(cases=st.lists(st.tuples(member_sets, shard_counts), min_size=30, max_size=30))
def test_members_in_separate_processes_with_their_own_hash_seeds_split_every_shard_once(
    cases: list[tuple[list[str], int]]
) -> None:
    # Pollers are separate processes, each with its own string hashing. A share that followed a
    # set's iteration order would agree within one process and differ between processes: some
    # shards wanted by none, others by two. A process per hash seed computes its members' shares
    # for a whole batch of cases, so the processes started stay few.
    payload = json.dumps(cases)
    shares_by_process = []
    for process in range(PROCESSES):
        done = subprocess.run([sys.executable, "-c", SHARES_IN_A_PROCESS, str(process), str(PROCESSES)],
                              input=payload, env={**os.environ, "PYTHONHASHSEED": str(101 + process)},
                              capture_output=True, text=True, check=True)
        shares_by_process.append(json.loads(done.stdout))
    for index, (_members, shard_count) in enumerate(cases):
        shares = {me: share for process in shares_by_process for me, share in process[index].items()}
        assert_a_partition(shares, shard_count)
