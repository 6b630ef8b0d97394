"""Forged containers of every codec (a valid CRC, a hostile header or payload) end in library errors, fast."""

from __future__ import annotations

import resource
import struct
import time
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kakeyaturbo import fuzzing

MEMORY_GROWTH = 512 << 20


@pytest.fixture(scope="module")
def bases() -> list[fuzzing.Base]:
    return fuzzing.bases()


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def test_every_codec_and_mutation_is_covered(bases):
    assert {b.name for b in bases} == set(fuzzing.codecs.names())
    for base in bases:
        assert fuzzing.outcome(base, base.blob) == ("decoded", str(base.dtype))


def test_forged_containers_raise_only_library_errors_in_bounded_time_and_memory(bases):
    peak = _peak()
    seen: set[str] = set()

    @settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(index=st.integers(0, len(bases) - 1), mutation=st.sampled_from(sorted(fuzzing.MUTATIONS)),
           seed=st.integers(0, 2**32 - 1))
    def forged(index, mutation, seed):
        base = bases[index]
        blob = fuzzing.forge(base, mutation, seed)
        t0 = time.perf_counter()
        kind, detail = fuzzing.outcome(base, blob)
        elapsed = time.perf_counter() - t0
        assert kind in ("decoded", "library_error"), f"{base.name} {mutation} seed {seed}: {kind} {detail}"
        assert elapsed < fuzzing.HANG_SECONDS, f"{base.name} {mutation} seed {seed}: {elapsed:.2f} s"
        seen.add(kind)

    forged()
    assert seen == {"decoded", "library_error"}
    assert _peak() - peak < MEMORY_GROWTH


@pytest.mark.parametrize("mutation", sorted(fuzzing.MUTATIONS))
def test_mutations_forge_new_blobs_and_all_but_random_corruption_keep_a_valid_crc(bases, mutation):
    forged = [fuzzing.forge(base, mutation, seed) for base in bases[:4] for seed in range(4)]
    assert sum(f not in {b.blob for b in bases} for f in forged) >= len(forged) // 2
    if mutation not in ("bitflip", "truncate"):
        assert all(zlib.crc32(f[:-4]) == struct.unpack("<I", f[-4:])[0] for f in forged)
