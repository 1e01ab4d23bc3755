"""The Redis batch path's argsrepr is Celery's saferepr of the task arguments, whichever of its
two ways (repr() or saferepr) computes it."""

from __future__ import annotations

import pytest
from celery.utils.saferepr import saferepr

from pool.redis_batch import args_repr

# Each string is one case where repr() and saferepr disagree, alone: a quote, a backslash, an
# unprintable character; then strings where they agree.
NAMES = ["it's", "back\\slash", "tab\there", "nul\x00", "both ' and \"", "plain", "\u00fcn\u2603", ""]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("source", [None, "s", "o'k"])
def test_args_repr_is_celerys_saferepr(name, source):
    args = [{"id": 7, "name": name, "value": 1.5, "source": source, "timestamp": None}]
    assert args_repr(args, 1024) == saferepr(args, 1024)


def test_args_repr_of_text_around_the_size_limit_is_celerys():
    for length in range(0, 120):
        args = [{"id": 1, "name": "x" * length, "value": 1.0, "source": None, "timestamp": None}]
        for maxsize in (60, 100, 1024):
            assert args_repr(args, maxsize) == saferepr(args, maxsize), (length, maxsize)
