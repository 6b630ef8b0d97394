"""``kakeya bench --generate`` on a tiny random Llama saved as a model folder (SmolLM2 tokenizer)."""

from __future__ import annotations

import json

import pytest

from kakeyaturbo.cli import main
from tests.conftest import TEXT


@pytest.mark.model
def test_generate_bench_rows_compare_with_dynamic_cache(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    from kakeyaturbo.models.loading import default_model_dir
    from tests.models.tiny_models import tiny_model

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    folder = tmp_path / "tiny"
    tiny_model("llama", vocab_size=len(tokenizer), max_position_embeddings=512,
               bos_token_id=tokenizer.bos_token_id).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join([TEXT] * 4))
    monkeypatch.setenv("KAKEYA_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "gen.json"
    assert main(["bench", "--generate", "--model", str(folder), "--text", str(text), "--recipe", "exact",
                 "--recipe", "fp8", "--ctx", "96", "--steps", "5", "--repeats", "1", "--decoded-budget", "0", "1",
                 "--json", str(out)]) == 0
    rows = {(r["cache"], r["decoded_budget_mb"]): r for r in json.loads(out.read_text())}
    assert set(rows) == {("DynamicCache", 0), ("exact", 0), ("exact", 1), ("fp8", 0), ("fp8", 1)}
    dynamic = rows["DynamicCache", 0]
    assert dynamic["ratio"] == dynamic["step_vs_dynamic"] == 1.0
    assert rows["exact", 0]["bytes_held"] == dynamic["bytes_held"]  # the same tokens, exactly
    assert rows["fp8", 0]["ratio"] > 1.5 > rows["fp8", 1]["ratio"]  # decoded copies are held bytes too
    for r in rows.values():
        assert r["per_token_s"] > 0 and r["prefill_s"] > 0 and r["ctx"] == 96 and r["steps"] == 5
    for name in ("exact", "fp8"):  # without decoded copies a step adds one token's K/V (or less)
        assert 0 < rows[name, 0]["max_step_growth"] <= dynamic["bf16_per_token"]
    assert "| 96 | fp8 | 1 |" in out.with_suffix(".md").read_text()
