"""bench_gpu: refuses CPU without --smoke; the smoke run writes JSON + Markdown with the device per row."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kakeyaturbo import bench_gpu
from kakeyaturbo.errors import ConfigError


def test_cpu_without_smoke_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="CUDA"):
        bench_gpu.run(tmp_path, device="cpu")
    assert not any(tmp_path.iterdir())


def test_smoke_on_cpu_writes_json_and_markdown(tmp_path: Path) -> None:
    assert bench_gpu.main(["--smoke", "--device", "cpu", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "gpu-cpu-smoke.json").read_text())
    att = [r for r in rows if r["bench"] == "decode_attention"]
    thr = [r for r in rows if r["bench"] == "codec_throughput"]
    s = bench_gpu.SMOKE
    assert len(att) == 2 * len(s.contexts) and len(thr) == 2 * len(s.cache_tokens)
    assert all(r["device"] == "cpu" for r in rows)
    assert all(r["ms"] > 0 and r["compressed_bytes"] < r["bf16_bytes"] for r in att)
    assert all(r["encode_GBps"] > 0 and r["ratio"] > 1 for r in thr)
    md = (tmp_path / "gpu-cpu-smoke.md").read_text()
    assert md.count("| cpu |") == len(rows)


def test_to_chunks_is_the_engine_head_layout() -> None:
    x = torch.arange(2 * 8 * 3).float().reshape(2, 8, 3)
    y = bench_gpu.to_chunks(x, 4)
    assert y.shape == (2, 2, 4, 3)
    assert torch.equal(y[1, 0], x[0, 4:8])
