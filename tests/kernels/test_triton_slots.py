import pytest
import torch
from hypothesis import given, settings

from kakeyaturbo.kernels.prefix_slots import walk_slots
from tests.kernels.slot_cases import walk_cases

pytest.importorskip("triton")


@settings(max_examples=25, deadline=None)
@given(case=walk_cases())
def test_triton_walk_equals_the_compiled_walk_on_any_bytes(device, case):
    """On CPU tensors through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), or on a GPU."""
    from kakeyaturbo.kernels.triton_slots import walk_slots_triton

    msb, code = case.msb(), case.code
    rest = (code.lengths.shape[1], code.max_len, case.rows, case.slot, case.width)
    want = walk_slots(msb, case.cls, case.raw_bits, code.canonical, *rest)
    got = walk_slots_triton(msb.to(device), case.cls.to(device), case.raw_bits.to(device), code.to(device).canonical,
                            *rest)
    for g, w in zip(got, want):
        assert torch.equal(g.cpu(), w)


def test_cuda_slots_take_the_triton_walk():
    from kakeyaturbo.ops.prefix_code import compiled_walk

    assert compiled_walk(torch.device("cuda")) and compiled_walk(torch.device("cpu"))
    assert not compiled_walk(torch.device("mps"))
