"""``kt.calibrate`` + ``kt.compress``: statistics from plain texts, then one verb to a working cache
whose fits are memoised in the bundle directory (a second build reads them back)."""

from __future__ import annotations

import pytest
import torch

import kakeyaturbo as kt
from kakeyaturbo import recipes
from kakeyaturbo.errors import ConfigError
from tests.conftest import TEXT, TINY_PROBE


@pytest.mark.model
def test_calibrate_then_compress_generates_and_memoises(tmp_path, tiny_bundle):
    model, _ = tiny_bundle
    from transformers import AutoTokenizer

    from kakeyaturbo.models.loading import default_model_dir

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    cal = kt.calibrate(model, tokenizer, [TEXT[:12_000], TEXT[12_000:]], windows=2, tokens=96, out=tmp_path / "b")
    assert (tmp_path / "b" / "statistics.safetensors").is_file() and not (tmp_path / "b" / "fits").exists()
    recipe = recipes.Recipe.from_dict({**recipes.load("kakeya-balanced").to_dict(), "chunk_tokens": 16,
                                       "probe": {"config": {}, "layout": "head", **TINY_PROBE}})
    cache = kt.compress(model, recipe, calibration=cal)
    fits = sorted(p.name for p in (tmp_path / "b" / "fits").iterdir())
    assert sum(name.startswith("sensitivity-") for name in fits) == 1 and sum(n.startswith("v2-") for n in fits) > 6
    ids = tokenizer("Dear Jane, the weather", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, cache=cache, max_new_tokens=40, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 40 and cache.memory_report()["packed"] > 0
    again = kt.compress(model, recipe, calibration=kt.Calibration.load(tmp_path / "b"))
    assert sorted(p.name for p in (tmp_path / "b" / "fits").iterdir()) == fits  # read back, nothing refitted
    assert [p.k_codec.config for p in again.plans] == [p.k_codec.config for p in cache.plans]


@pytest.mark.model
def test_compress_errors(tiny_bundle):
    model, cal = tiny_bundle
    with pytest.raises(ConfigError, match=r"pass calibration=kt.calibrate\(model, tokenizer, texts\)"):
        kt.compress(model, "kakeya-max")
    assert kt.compress(model, "fp8").recipe.name == "fp8"  # baselines need no calibration
    with pytest.raises(ConfigError, match="texts must be a string"):
        kt.calibrate(model, None, 42)
    with pytest.raises(ConfigError, match="unknown recipe"):
        kt.compress(model, "kakeya-9q", calibration=cal)
