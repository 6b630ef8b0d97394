"""Cross-layer groups: forming them per layer type, naming them, and their side-by-side rows."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kakeyaturbo import groups
from kakeyaturbo.errors import ConfigError


def test_groups_are_runs_of_one_layer_type_ordered_by_their_last_layer():
    types = ["s", "s", "f", "s", "s", "s", "f", "s"]
    assert groups.form(range(8), types, 2) == [(0, 1), (3, 4), (2, 6), (5, 7)]
    assert groups.form([0, 1, 3, 4, 5], ["f"] * 6, 4) == [(0, 1, 3, 4), (5,)]  # layer 2 left out (a boundary)
    assert groups.form(range(3), ["f"] * 3, 1) == [(0,), (1,), (2,)]
    assert groups.form([], [], 4) == []


@pytest.mark.parametrize("size", [0, -1, True, 2.0, "4"])
def test_bad_group_sizes_are_refused(size):
    with pytest.raises(ConfigError, match="layer_group must be an integer >= 1"):
        groups.form(range(4), ["f"] * 4, size)


def test_names():
    assert groups.name(4) == groups.name((4,)) == "layer 4"
    assert groups.name((4, 5, 6, 7)) == "layers 4-7"
    assert groups.name((5, 11, 17)) == "layers 5,11,17"


@given(members=st.integers(1, 4), n_kv=st.integers(1, 3), tokens=st.integers(1, 5), seed=st.integers(0, 99))
def test_split_inverts_join(members, n_kv, tokens, seed):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(2, n_kv, tokens, 4, generator=g) for _ in range(members)]
    joined = groups.join(xs)
    assert joined.shape == (2, members * n_kv, tokens, 4)
    assert all(torch.equal(a, b) for a, b in zip(groups.split(joined, members), xs))
