import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kakeyaturbo.errors import ShapeError
from kakeyaturbo.kernels.prefix_slots import walk_slots
from kakeyaturbo.ops import prefix_code
from kakeyaturbo.ops.prefix_code import _walk_compiled, _walk_torch
from kakeyaturbo.packing import packed_nbytes
from tests.kernels.slot_cases import random_code, walk_cases


@given(case=walk_cases())
def test_compiled_walk_equals_the_torch_walk_on_any_bytes(case):
    """The two walks read any stream alike, valid or not: entries, raw values and where rows end."""
    args = (case.code, case.packed, case.cls, case.raw_bits, case.rows, case.slot, case.width, case.wide)
    for got, want in zip(_walk_compiled(*args), _walk_torch(*args)):
        assert torch.equal(got.to(want.dtype), want)


def test_cpu_reads_take_the_compiled_walk(monkeypatch):
    seen = []
    monkeypatch.setattr(prefix_code, "_walk_compiled", lambda *a: seen.append("compiled") or _walk_torch(*a))
    code = random_code(0, 7)
    zeros = torch.zeros(1, 3, dtype=torch.long)
    prefix_code.read_slot_columns(code, torch.zeros(packed_nbytes(2 * 24, 1), dtype=torch.uint8), zeros, zeros, 2, 24)
    assert seen == ["compiled"]


def test_a_short_stream_is_refused():
    code = random_code(0, 7)
    with pytest.raises(ShapeError, match="padded bytes"):
        walk_slots(torch.zeros(2, dtype=torch.uint8), torch.zeros(1, 4, dtype=torch.int32),
                   torch.zeros(1, 4, dtype=torch.int32), code.canonical, 11, 7, 3, 8, 7)


@given(seed=st.integers(0, 2**31), max_len=st.integers(4, 14))
def test_canonical_tables_decode_every_codeword(seed, max_len):
    """Every codeword, followed by any bits, decodes to its symbol and length from the small tables."""
    code = random_code(seed, max_len)
    t = code.canonical
    a, m = code.lengths.shape[1], max_len
    for c in range(code.lengths.shape[0]):
        for sym in range(a):
            n = int(code.lengths[c, sym])
            w = (int(code.codes[c, sym]) << (m - n)) | (seed % (1 << (m - n)))
            e = int(t.short[(c << t.bits) + (w >> (m - t.bits))])
            if e & 31 != 31:
                assert (e >> 5, e & 31) == (sym, n)
                continue
            k = t.bits + 1
            while w >= int(t.limit[c * (m + 1) + k]):
                k += 1
            rank = int(t.offset[c * (m + 1) + k]) + (w >> (m - k)) - int(t.first[c * (m + 1) + k])
            assert (int(t.order[c * a + rank]), k) == (sym, n)
