"""Shared fixtures. Set KAKEYA_TEST_DEVICE=cuda to run device-parametrized tests on a GPU."""

from __future__ import annotations

import os

if os.environ.get("KAKEYA_TEST_DEVICE", "cpu") == "cpu":  # before anything imports triton: its kernels then run
    os.environ.setdefault("TRITON_INTERPRET", "1")  # on CPU tensors through Triton's interpreter

import pytest
import torch
from hypothesis import settings
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from kakeyaturbo.calibration import CalibrationSettings, measure
from kakeyaturbo.models.loading import default_model_dir
from kakeyaturbo.models.text import Corpus

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


TEXT = " ".join(f"Sentence {i} tells of the weather, the ball at Netherfield and letters." for i in range(400))
SETTINGS = CalibrationSettings(windows=2, tokens=96)
TINY_PROBE = {"windows": 1, "ctx": 48, "n_eval": 16, "budgets": [2.0, 3.0], "grid": [2.0, 2.5, 3.0]}
"""A sensitivity probe the tiny calibration windows can serve."""


@pytest.fixture(scope="session")
def tiny_bundle():
    """A tiny random Llama (real SmolLM2 tokenizer) and the statistics of a small calibration of it
    (in memory: fits are made on demand by each test that asks)."""
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=tokenizer.bos_token_id)
    model = LlamaForCausalLM(config).eval()
    corpus = Corpus("toy", calibration=TEXT, evaluation="", split_note="all text is calibration")
    return model, measure(model, tokenizer, corpus, SETTINGS, model_name="tiny", text="toy")
