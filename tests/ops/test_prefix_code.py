import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kakeyaturbo.errors import ConfigError, CorruptDataError, NumericRangeError
from kakeyaturbo.ops.prefix_code import PrefixCode, huffman_lengths, read_slots, slot_lengths, write_slots
from kakeyaturbo.packing import packed_nbytes


@given(weights=st.lists(st.floats(1e-9, 1e3), min_size=2, max_size=40), max_len=st.integers(6, 16))
def test_huffman_lengths_are_complete_and_limited(weights, max_len):
    lengths = huffman_lengths(weights, max_len)
    assert max(lengths) <= max_len
    assert sum(2.0 ** -n for n in lengths) == pytest.approx(1.0)


def test_huffman_lengths_are_optimal_on_dyadic_weights():
    assert huffman_lengths([8, 4, 2, 1, 1], 8) == [1, 2, 3, 4, 4]


def test_bad_weights_raise():
    with pytest.raises(ConfigError, match="2..2\\*\\*max_len symbols"):
        huffman_lengths([1.0], 4)
    with pytest.raises(ConfigError, match="> 0"):
        huffman_lengths([1.0, 0.0], 4)


def _code(seed: int, classes: int = 3, symbols: int = 9, max_len: int = 7) -> PrefixCode:
    g = torch.Generator().manual_seed(seed)
    return PrefixCode.from_weights(torch.rand(classes, symbols, generator=g) ** 3 + 1e-3, max_len)


@given(seed=st.integers(0, 2**31))
def test_codes_are_canonical_prefix_free_and_the_lut_decodes_them(seed):
    code = _code(seed)
    for c in range(code.lengths.shape[0]):
        words = [(int(v), int(n)) for v, n in zip(code.codes[c], code.lengths[c])]
        strings = [format(v, f"0{n}b") for v, n in words]
        assert all(not b.startswith(a) for a in strings for b in strings if a is not b)
        for sym, (v, n) in enumerate(words):
            entry = v << (code.max_len - n)
            assert int(code.lut_symbol[c, entry]) == sym and int(code.lut_length[c, entry]) == n


@given(seed=st.integers(0, 2**31), rows=st.integers(0, 12), cols=st.integers(1, 9), spare=st.integers(0, 9))
def test_slots_roundtrip(seed, rows, cols, spare):
    g = torch.Generator().manual_seed(seed)
    code = _code(seed)
    symbols = torch.randint(0, 9, (rows, cols), generator=g)
    classes = torch.randint(-1, 3, (1, cols), generator=g)
    raw_bits = torch.randint(0, 5, (1, cols), generator=g)
    raw = (torch.rand(rows, cols, generator=g) * (1 << raw_bits)).long()
    need = int(slot_lengths(code, symbols, classes, raw_bits).sum(1).max()) if rows else 0
    slot = need + spare
    packed = write_slots(code, symbols, classes, raw, raw_bits, slot)
    assert packed.numel() == packed_nbytes(rows * slot, 1)
    got_sym, got_raw = read_slots(code, packed, classes, raw_bits, rows, slot)
    coded = (classes >= 0).expand(rows, cols)
    assert torch.equal(got_sym[coded], symbols[coded]) and torch.equal(got_raw[coded], raw[coded])
    assert not got_sym[~coded].any() and not got_raw[~coded].any()


def test_a_row_that_does_not_fit_raises():
    code = _code(0)
    symbols = torch.zeros(2, 4, dtype=torch.long)
    zeros = torch.zeros(1, 4, dtype=torch.long)
    need = int(slot_lengths(code, symbols, zeros, zeros).sum(1).max())
    with pytest.raises(NumericRangeError, match=f"needs {need} bits, the slot holds {need - 1}"):
        write_slots(code, symbols, zeros, zeros.expand(2, 4), zeros, need - 1)


def test_corrupt_slots_raise():
    code = _code(1)
    zeros = torch.zeros(1, 6, dtype=torch.long)
    with pytest.raises(CorruptDataError, match="expected 2 uint8 bytes"):
        read_slots(code, torch.zeros(3, dtype=torch.uint8), zeros, zeros, 2, 8)
    longest = int(code.lengths[0].argmax())
    ones = torch.full((1,), 255, dtype=torch.uint8)  # all-one bits decode as the longest codewords
    assert int(code.lengths[0, longest]) * 6 > 8
    with pytest.raises(CorruptDataError, match="past its 8-bit slot"):
        read_slots(code, ones, zeros, zeros, 1, 8)
