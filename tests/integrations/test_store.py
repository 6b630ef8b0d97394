"""KVStore: atomic writes, reads shared by processes, the byte budget (LRU) and the memory tier."""

from __future__ import annotations

import os
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kakeyaturbo.errors import ConfigError
from kakeyaturbo.integrations.store import KVStore

KEYS = [f"{i:02x}" * 16 for i in range(8)]


def test_put_get_and_a_second_process_view(tmp_path):
    store = KVStore(tmp_path / "s")
    assert store.get(KEYS[0]) is None and KEYS[0] not in store
    store.put(KEYS[0], b"abc")
    other = KVStore(tmp_path / "s")  # another process: same directory, empty memory
    assert other.get(KEYS[0]) == b"abc" and KEYS[0] in other
    assert store.path(KEYS[0]).parent.name == KEYS[0][:2]
    assert not list(store.directory.rglob(".tmp-*"))  # no temp file left behind
    store.discard(KEYS[0])
    assert other.get(KEYS[0]) is None


def test_budget_evicts_least_recently_used(tmp_path):
    store = KVStore(tmp_path)
    for i, key in enumerate(KEYS[:3]):
        store.put(key, bytes(100))
        os.utime(store.path(key), (time.time() - 100 + i, time.time() - 100 + i))
    store = KVStore(tmp_path, budget=250)
    store.get(KEYS[0])  # used: now the most recent
    store.put(KEYS[3], bytes(100))
    held = {key for key, _, _ in store.entries()}
    assert held == {KEYS[0], KEYS[3]} and sum(size for _, size, _ in store.entries()) <= 250


def test_memory_tier_is_bounded_and_serves_reads(tmp_path):
    store = KVStore(tmp_path, memory=250)
    for key in KEYS[:3]:
        store.put(key, bytes(100))
    assert list(store._hot) == KEYS[1:3] and store._hot_bytes == 200
    store.path(KEYS[2]).unlink()
    assert store.get(KEYS[2]) == bytes(100)  # from memory


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(KEYS), st.binary(max_size=64)), max_size=20))
def test_last_write_wins_and_reads_are_whole(tmp_path_factory, writes):
    store = KVStore(tmp_path_factory.mktemp("h"), memory=100)
    expect = {}
    for key, blob in writes:
        store.put(key, blob)
        expect[key] = blob
    fresh = KVStore(store.directory)
    assert {key: fresh.get(key) for key in expect} == expect


@pytest.mark.parametrize("bad", ["", "XYZ", "../" + KEYS[0], "AB" * 16, 5])
def test_bad_keys_and_sizes(tmp_path, bad):
    store = KVStore(tmp_path)
    with pytest.raises(ConfigError, match="store key"):
        store.put(bad, b"x")
    with pytest.raises(ConfigError, match="budget"):
        KVStore(tmp_path, budget=-1)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="cannot use"):
        KVStore(tmp_path / "file" / "sub")
