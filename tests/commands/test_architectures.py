"""The shipped recipes end to end (``kakeya calibrate`` -> ``eval`` -> ``generate``) on a tiny random
model of every supported architecture, saved as a local model folder with the SmolLM2 tokenizer:
Llama (llama3-scaled RoPE), Mistral with a window on every layer, Qwen2 (biases), Qwen3 (q/k-norm),
Gemma 3 (sliding and full layers, q/k-norm, a RoPE base per layer type), MQA (one KV head) and
head_dim 256. The windows (96 tokens) are shorter than the evaluation context, so sliding layers are
evaluated past their window."""

from __future__ import annotations

import json

import pytest

from kakeyaturbo.recipes.kakeya import PRESETS
from tests.conftest import TEXT
from tests.models.tiny_models import FAMILIES, SLIDING_FAMILIES

SHIPPED = tuple(PRESETS)
WINDOW = 96


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text("\n\n".join(f"Letter {i}. {TEXT[: 6000]}" for i in range(40)))
    return path


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from kakeyaturbo.models.loading import default_model_dir

    return AutoTokenizer.from_pretrained(default_model_dir())


def _folder(family: str, tokenizer, root):
    from tests.models.tiny_models import tiny_model

    sizes = {"vocab_size": len(tokenizer), "max_position_embeddings": 2048, "bos_token_id": tokenizer.bos_token_id,
             "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.eos_token_id}
    if family in SLIDING_FAMILIES:
        sizes["sliding_window"] = WINDOW
    tiny_model(family, **sizes).save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


@pytest.mark.model
@pytest.mark.parametrize("family", FAMILIES)
def test_shipped_recipes_calibrate_eval_generate(family, tmp_path, text_file, tokenizer, monkeypatch, capsys):
    from kakeyaturbo.cli import main

    model = _folder(family, tokenizer, tmp_path / family)
    monkeypatch.setenv("KAKEYA_CACHE", str(tmp_path / "cache"))
    common = ["--model", str(model), "--text", str(text_file), "--dtype", "float32"]
    assert main(["calibrate", *common, "--windows", "6", "--tokens", "512"]) == 0
    recipes = [arg for name in (*SHIPPED, "fp8", "kivi-4") for arg in ("--recipe", name)]
    out = tmp_path / "r.json"
    assert main(["eval", *common, *recipes, "--ctx", "256", "--n-eval", "16", "--windows", "1",
                 "--json", str(out)]) == 0
    records = {r["recipe"]: r for r in json.loads(out.read_text())}
    assert set(records) == {*SHIPPED, "fp8", "kivi-4"}
    for name in SHIPPED:  # every layer compressed (no exact layer), and more than fp8 / KIVI-4
        bits = records[name]["layer_bits"]
        assert all(k is not None and v is not None for k, v in bits), (name, bits)
        assert records[name]["ratio"] > records["kivi-4"]["ratio"] > 1.0
    capsys.readouterr()
    assert main(["generate", *common, "--recipe", "kakeya-balanced", "--prompt", "Dear Jane,",
                 "--max-new-tokens", "8"]) == 0
    assert "ratio" in capsys.readouterr().out
