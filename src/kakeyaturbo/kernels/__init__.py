"""Attention kernels that read the compressed cache directly (torch reference; Triton optional)."""

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
