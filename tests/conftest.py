"""Shared fixtures. Set KAKEYA_TEST_DEVICE=cuda to run device-parametrized tests on a GPU."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

settings.register_profile("ci", max_examples=40, deadline=None)
settings.load_profile("ci")


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The device the codec tests run on (CPU unless KAKEYA_TEST_DEVICE says otherwise)."""
    name = os.environ.get("KAKEYA_TEST_DEVICE", "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("KAKEYA_TEST_DEVICE=cuda but no CUDA device")
    return torch.device(name)


def lowrank(streams: int, n: int, d: int, rank: int, noise: float = 0.01, seed: int = 0) -> torch.Tensor:
    """Rank-``rank`` data plus small noise, ``[streams, n, d]`` float32, with a nonzero mean."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(streams, n, rank, generator=g) * torch.linspace(3.0, 0.5, rank)
    b = torch.randn(streams, rank, d, generator=g) / rank**0.5
    mean = torch.randn(streams, 1, d, generator=g)
    return mean + a @ b + noise * torch.randn(streams, n, d, generator=g)
