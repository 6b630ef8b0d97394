import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kakeyaturbo.kernels.prefix_slots import walk_slots
from kakeyaturbo.ops.prefix_code import _REVERSED, PrefixCode, _positions
from kakeyaturbo.packing import packed_nbytes

pytest.importorskip("triton")


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), rows=st.integers(1, 9), cols=st.integers(1, 10), slot=st.integers(1, 60),
       per_row=st.booleans(), max_len=st.integers(4, 14), raw_max=st.integers(0, 16))
def test_triton_walk_equals_the_compiled_walk_on_any_bytes(device, seed, rows, cols, slot, per_row, max_len, raw_max):
    """On CPU tensors through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), or on a GPU."""
    from kakeyaturbo.kernels.triton_slots import walk_slots_triton

    g = torch.Generator().manual_seed(seed)
    code = PrefixCode.from_weights(torch.rand(4, 11, generator=g) ** 3 + 1e-3, max_len)
    lead = rows if per_row else 1
    classes = torch.randint(-1, 4, (lead, cols), generator=g)
    raw_bits = torch.randint(0, raw_max + 1, (lead, cols), generator=g)
    packed = torch.randint(0, 256, (packed_nbytes(rows * slot, 1),), generator=g, dtype=torch.uint8)
    cls, rb = _positions(code, classes, raw_bits, rows)
    width = max(max_len, int(rb.max()))
    msb = torch.zeros(packed_nbytes(rows * slot + cols * 2 * width, 1) + 3, dtype=torch.uint8)
    msb[: packed.numel()] = _REVERSED.index_select(0, packed.to(torch.int32))
    args = (msb, cls, rb, code.canonical, 11, max_len, rows, slot, width)
    on = (msb.to(device), cls.to(device), rb.to(device), code.to(device).canonical, 11, max_len, rows, slot, width)
    for got, want in zip(walk_slots_triton(*on), walk_slots(*args)):
        assert torch.equal(got.cpu(), want)


def test_cuda_slots_take_the_triton_walk():
    from kakeyaturbo.ops.prefix_code import compiled_walk

    assert compiled_walk(torch.device("cuda")) and compiled_walk(torch.device("cpu"))
    assert not compiled_walk(torch.device("mps"))
