"""``kakeya store``: a store's prefixes, tokens, bytes and ratio, read from block headers alone."""

from __future__ import annotations

import json

import torch

from kakeyaturbo.cli import main
from kakeyaturbo.engine import build_plans
from kakeyaturbo.integrations.blocks import BlockCodec, BlockIdentity, prefix_keys
from kakeyaturbo.integrations.store import KVStore
from kakeyaturbo.recipes import Recipe, StreamRecipe


def test_store_summary(tmp_path, capsys):
    store = KVStore(tmp_path / "s")
    ident = BlockIdentity("tiny", "cafe", "f" * 64, "")
    codec = BlockCodec(build_plans(Recipe("fp8", StreamRecipe("fp8"), StreamRecipe("fp8"), chunk_tokens=16),
                                   2, 2, 16), 32, ident)
    x = torch.randn(2, 2, 32, 16, generator=torch.Generator().manual_seed(0)).bfloat16()
    for start, key in zip((0, 32), prefix_keys(list(range(64)), 32, ident)):
        store.put(key, codec.encode(x, x, start))
    store.put("ab" * 16, b"not a block")
    assert main(["store", str(tmp_path / "s"), "--json", str(tmp_path / "s.json")]) == 0
    out = json.loads((tmp_path / "s.json").read_text())
    (group,) = out["groups"]
    assert (group["prefixes"], group["blocks"], group["tokens"], out["damaged"]) == (1, 2, 64, 1)
    assert group["bf16_bytes"] == 2 * 2 * 64 * 2 * 2 * 16 and 1.2 < group["ratio"] < 2  # fp8, its scales and headers
    assert "1 prefixes, 2 blocks, 64 tokens" in capsys.readouterr().out


def test_store_needs_a_directory(tmp_path, capsys):
    assert main(["store", str(tmp_path / "missing")]) == 1
    assert "not a directory" in capsys.readouterr().err
