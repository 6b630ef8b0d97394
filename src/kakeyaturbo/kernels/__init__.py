"""Kernels: decode attention straight from the compressed cache (torch reference), and the compiled
walks of prefix-code slots (:mod:`kakeyaturbo.kernels.prefix_slots`, numba on the CPU;
:mod:`kakeyaturbo.kernels.triton_slots`, Triton on CUDA)."""

from kakeyaturbo.kernels.attention import (
    CompressedSpan,
    ExactSpan,
    LayerStore,
    RotatedIntSegment,
    Segment,
    V2Segment,
    compressed_decode_attention,
    segment_from_encoded,
)

__all__ = [
    "CompressedSpan",
    "ExactSpan",
    "LayerStore",
    "RotatedIntSegment",
    "Segment",
    "V2Segment",
    "compressed_decode_attention",
    "segment_from_encoded",
]
